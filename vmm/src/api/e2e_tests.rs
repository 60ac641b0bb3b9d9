//! End-to-end tests: a real server on a temporary socket, a fake VMM thread
//! answering its requests, raw clients and curl.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use super::server::Timeouts;
use super::*;

/// A fresh directory for one test's socket; removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("vmm-api-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in for the VMM's event loop: waits on the wake eventfd, then
/// drains the channel, like the real loop. Ends after answering Stop.
fn fake_vmm(rx: mpsc::Receiver<ApiRequest>, wake: EventFd) -> JoinHandle<Vec<ApiAction>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut paused = false;
        loop {
            wake.read().unwrap();
            while let Ok(req) = rx.try_recv() {
                seen.push(req.action.clone());
                let reply = match req.action {
                    ApiAction::GetVm => Ok(json!({
                        "state": if paused { "Paused" } else { "Running" },
                        "config": {"vcpus": 1}
                    })),
                    ApiAction::Pause if paused => Err(ApiFailure::bad_request("already paused")),
                    ApiAction::Pause => {
                        paused = true;
                        Ok(Value::Null)
                    }
                    ApiAction::Resume => {
                        paused = false;
                        Ok(Value::Null)
                    }
                    ApiAction::CreateSnapshot(_) if !paused => {
                        Err(ApiFailure::bad_request("pause the VM first"))
                    }
                    ApiAction::CreateSnapshot(_) => Ok(Value::Null),
                    ApiAction::LoadSnapshot(p) => Ok(serde_json::to_value(p).unwrap()),
                    ApiAction::MergeDiff(_) => Err(ApiFailure::new(42, "odd status")),
                    ApiAction::SaveWorkingSet | ApiAction::MemoryStats => {
                        Err(ApiFailure::bad_request("not a lazily restored VM"))
                    }
                    ApiAction::Stop => {
                        let _ = req.reply.send(Ok(Value::Null));
                        return seen;
                    }
                };
                let _ = req.reply.send(reply);
            }
        }
    })
}

struct Setup {
    _dir: TempDir,
    sock: PathBuf,
    server: Option<ApiServerHandle>,
    vmm: Option<JoinHandle<Vec<ApiAction>>>,
}

fn setup(tag: &str, timeouts: Timeouts) -> Setup {
    let dir = TempDir::new(tag);
    let sock = dir.sock();
    let (tx, rx) = mpsc::channel();
    let wake = EventFd::new(0).unwrap();
    let server = ApiServer::spawn_with(&sock, tx, wake.try_clone().unwrap(), timeouts).unwrap();
    let vmm = fake_vmm(rx, wake);
    Setup {
        _dir: dir,
        sock,
        server: Some(server),
        vmm: Some(vmm),
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    fn fault(&self) -> String {
        self.json()["fault_message"].as_str().unwrap().to_string()
    }
}

/// Reads one response; `None` at a clean end of stream.
fn read_resp(r: &mut BufReader<UnixStream>) -> Option<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap() == 0 {
        return None;
    }
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (n, v) = h.split_once(':').unwrap();
        headers.push((n.to_string(), v.trim().to_string()));
    }
    let mut resp = Resp {
        status,
        headers,
        body: String::new(),
    };
    if let Some(len) = resp.header("Content-Length") {
        let mut body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
        resp.body = String::from_utf8(body).unwrap();
    }
    Some(resp)
}

fn connect(sock: &Path) -> (UnixStream, BufReader<UnixStream>) {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = BufReader::new(s.try_clone().unwrap());
    (s, r)
}

fn request(method: &str, path: &str, body: Option<&str>) -> String {
    match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
    }
}

/// Sends raw bytes on a fresh connection; returns the first response and
/// whether the server then closed the connection.
fn one_shot(sock: &Path, bytes: &[u8]) -> (Resp, bool) {
    let (mut s, mut r) = connect(sock);
    s.write_all(bytes).unwrap();
    let resp = read_resp(&mut r).unwrap();
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let closed = r.read_to_end(&mut rest).is_ok();
    (resp, closed)
}

#[test]
fn raw_client_end_to_end() {
    let mut t = setup("raw", Timeouts::default());
    let (mut s, mut r) = connect(&t.sock);
    let mut ask = |req: String| {
        s.write_all(req.as_bytes()).unwrap();
        read_resp(&mut r).unwrap()
    };

    let v = ask(request("GET", "/version", None));
    assert_eq!(v.status, 200);
    assert_eq!(v.header("Content-Type"), Some("application/json"));
    assert_eq!(
        v.json(),
        json!({"vmm_version": env!("CARGO_PKG_VERSION"), "api_version": "1"})
    );
    let v = ask(request("GET", "/vm", None));
    assert_eq!(
        (v.status, v.json()["state"].clone()),
        (200, json!("Running"))
    );
    let v = ask(request(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path":"s","mem_file_path":"m"}"#),
    ));
    assert_eq!((v.status, v.fault()), (400, "pause the VM first".into()));
    let v = ask(request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)));
    assert_eq!(v.status, 204);
    assert_eq!(v.header("Content-Length"), None);
    let v = ask(request("PATCH", "/vm", Some(r#"{"state":"Paused"}"#)));
    assert_eq!((v.status, v.fault()), (400, "already paused".into()));
    let v = ask(request(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"m"}"#),
    ));
    assert_eq!(v.status, 204);
    let v = ask(request(
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path":"s","mem_file_path":"/m","resume_vm":true}"#),
    ));
    assert_eq!(v.status, 200);
    assert_eq!(
        v.json()["mem_backend"],
        json!({"backend_type": "File", "backend_path": "/m"})
    );
    let v = ask(request(
        "PUT",
        "/snapshot/merge",
        Some(r#"{"base_mem_file_path":"b","diff_mem_file_path":"d","snapshot_path":"s"}"#),
    ));
    assert_eq!((v.status, v.fault()), (500, "odd status".into()));

    // Errors that keep the connection usable.
    let v = ask(request("GET", "/nope", None));
    assert_eq!(v.status, 404);
    let v = ask(request("DELETE", "/vm", None));
    assert_eq!((v.status, v.header("Allow")), (405, Some("GET, PATCH")));
    let v = ask(request("PATCH", "/vm", Some(r#"{"state":"Stopped"}"#)));
    assert_eq!(v.status, 400);
    assert!(
        v.fault().contains("unknown variant `Stopped`"),
        "{}",
        v.fault()
    );
    let v = ask(request(
        "PUT",
        "/snapshot/load",
        Some(r#"{"snapshot_path":"s","mem_file_path":"m","junk":1}"#),
    ));
    assert!(v.fault().contains("unknown field `junk`"), "{}", v.fault());

    // Pipelined: three requests in one write, answered in order.
    let batch = [
        request("PATCH", "/vm", Some(r#"{"state":"Resumed"}"#)),
        request("GET", "/vm", None),
        request("GET", "/version", None),
    ]
    .concat();
    s.write_all(batch.as_bytes()).unwrap();
    let got: Vec<u16> = (0..3).map(|_| read_resp(&mut r).unwrap().status).collect();
    assert_eq!(got, [204, 200, 200]);

    // Byte by byte, with Expect: 100-continue.
    let body = r#"{"state":"Paused"}"#;
    let head = format!(
        "PATCH /vm HTTP/1.1\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    for b in head.bytes() {
        s.write_all(&[b]).unwrap();
    }
    let interim = read_resp(&mut r).unwrap();
    assert_eq!(interim.status, 100);
    for b in body.bytes() {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(read_resp(&mut r).unwrap().status, 204);

    // Connection: close is honored.
    s.write_all(b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let v = read_resp(&mut r).unwrap();
    assert_eq!((v.status, v.header("Connection")), (200, Some("close")));
    assert!(read_resp(&mut r).is_none());

    // Stop ends the fake VMM; afterwards the server answers 503 and lives on.
    let (v, _) = one_shot(
        &t.sock,
        request("PUT", "/actions", Some(r#"{"action_type":"Stop"}"#)).as_bytes(),
    );
    assert_eq!(v.status, 204);
    let seen = t.vmm.take().unwrap().join().unwrap();
    assert_eq!(seen.first(), Some(&ApiAction::GetVm));
    assert_eq!(seen.last(), Some(&ApiAction::Stop));
    let (v, _) = one_shot(&t.sock, request("GET", "/vm", None).as_bytes());
    assert_eq!(v.status, 503);
    let (v, _) = one_shot(&t.sock, request("GET", "/version", None).as_bytes());
    assert_eq!(v.status, 200);
}

#[test]
fn malformed_requests_close_the_connection() {
    let t = setup("bad", Timeouts::default());
    let big = format!(
        "PUT /snapshot/load HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_SIZE + 1
    );
    let long_head = format!(
        "GET /vm HTTP/1.1\r\nX: {}\r\n\r\n",
        "a".repeat(MAX_HEAD_SIZE)
    );
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400),
        (b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
        (b"PUT /actions HTTP/1.1\r\n\r\n".to_vec(), 411),
        (
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
            501,
        ),
        (big.into_bytes(), 413),
        (long_head.into_bytes(), 431),
        (b"GET /vm HTTP/3.0\r\n\r\n".to_vec(), 505),
        (b"\x00\xff\xfe\r\n\r\n".to_vec(), 400),
    ];
    for (bytes, want) in cases {
        let (v, closed) = one_shot(&t.sock, &bytes);
        assert_eq!(
            v.status,
            want,
            "{}",
            String::from_utf8_lossy(&bytes[..40.min(bytes.len())])
        );
        assert_eq!(v.header("Connection"), Some("close"));
        assert!(closed, "connection left open after {want}");
        assert!(!v.fault().is_empty());
    }
    // HEAD gets a 405 and a close, since it would not read the body.
    let (v, closed) = one_shot(&t.sock, b"HEAD /vm HTTP/1.1\r\n\r\n");
    assert_eq!(
        (v.status, v.header("Allow"), closed),
        (405, Some("GET, PATCH"), true)
    );
    // The server is still fine.
    let (v, _) = one_shot(&t.sock, request("GET", "/vm", None).as_bytes());
    assert_eq!(v.status, 200);
}

#[test]
fn slow_and_idle_clients_do_not_block_others() {
    let timeouts = Timeouts {
        request: Duration::from_millis(400),
        idle: Duration::from_secs(30),
        ..Timeouts::default()
    };
    let t = setup("slow", timeouts);

    // An idle keep-alive client is dropped as soon as another one waits.
    let (mut idle, mut idle_r) = connect(&t.sock);
    idle.write_all(request("GET", "/vm", None).as_bytes())
        .unwrap();
    assert_eq!(read_resp(&mut idle_r).unwrap().status, 200);
    let start = Instant::now();
    let (v, _) = one_shot(&t.sock, request("GET", "/version", None).as_bytes());
    assert_eq!(v.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(
        read_resp(&mut idle_r).is_none(),
        "idle connection not closed"
    );

    // A client stuck mid-request gets 408 after the request timeout, and the
    // next client is served right after.
    let (mut slow, mut slow_r) = connect(&t.sock);
    slow.write_all(b"GET /vm HTT").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let start = Instant::now();
    let (v, _) = one_shot(&t.sock, request("GET", "/version", None).as_bytes());
    assert_eq!(v.status, 200);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let v = read_resp(&mut slow_r).unwrap();
    assert_eq!((v.status, v.header("Connection")), (408, Some("close")));
}

/// A client that always sends its next request with the tail of the last
/// one is never idle; once another client waits, its next answer closes the
/// connection, and the other client is served.
#[test]
fn a_busy_client_hands_over_to_a_waiting_one() {
    let t = setup("busy", Timeouts::default());
    let (mut busy, mut busy_r) = connect(&t.sock);
    let get = request("GET", "/vm", None);
    let (head, tail) = get.as_bytes().split_at(5);
    busy.write_all(head).unwrap();
    let waiting = {
        let sock = t.sock.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let (v, _) = one_shot(&sock, request("GET", "/version", None).as_bytes());
            (v.status, start.elapsed())
        })
    };
    let mut closed = false;
    for _ in 0..200 {
        // The rest of this request and the start of the next, together.
        if busy
            .write_all(tail)
            .and_then(|()| busy.write_all(head))
            .is_err()
        {
            closed = true;
            break;
        }
        match read_resp(&mut busy_r) {
            Some(v) if v.header("Connection") == Some("close") => {
                closed = true;
                break;
            }
            Some(v) => assert_eq!(v.status, 200),
            None => {
                closed = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(closed, "the busy client kept the server to itself");
    let (status, took) = waiting.join().unwrap();
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn reply_timeout_and_shutdown_while_waiting() {
    let dir = TempDir::new("timeout");
    let sock = dir.sock();
    let (tx, rx) = mpsc::channel::<ApiRequest>();
    let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let timeouts = Timeouts {
        reply: Duration::from_millis(300),
        ..Timeouts::default()
    };
    let server = ApiServer::spawn_with(&sock, tx, wake.try_clone().unwrap(), timeouts).unwrap();
    // The "VMM" never answers: the server gives up with 504.
    let (v, _) = one_shot(&sock, request("GET", "/vm", None).as_bytes());
    assert_eq!(v.status, 504);
    assert_eq!(rx.try_recv().unwrap().action, ApiAction::GetVm);
    assert!(wake.read().unwrap() >= 1);
    drop(server);

    // Dropping the handle while a request waits on the VMM ends it promptly.
    let (tx, rx) = mpsc::channel::<ApiRequest>();
    let server = ApiServer::spawn(&sock, tx, wake.try_clone().unwrap()).unwrap();
    let (mut s, mut r) = connect(&sock);
    s.write_all(request("PUT", "/actions", Some(r#"{"action_type":"Stop"}"#)).as_bytes())
        .unwrap();
    let pending = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(pending.action, ApiAction::Stop);
    let start = Instant::now();
    drop(server);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(read_resp(&mut r).unwrap().status, 503);
    assert!(!sock.exists());
    // A late reply finds the server gone and is simply dropped.
    assert!(pending.reply.send(Ok(Value::Null)).is_err());
}

#[test]
fn socket_lifecycle() {
    let dir = TempDir::new("sock");
    let sock = dir.sock();
    let spawn = || {
        let (tx, _rx) = mpsc::channel();
        ApiServer::spawn(&sock, tx, EventFd::new(libc::EFD_NONBLOCK).unwrap())
    };

    // A stale socket (bound, nobody listening any more) is replaced.
    drop(UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let first = spawn().unwrap();
    assert_eq!(first.socket_path(), sock);

    // A live server is not.
    assert!(matches!(spawn(), Err(ApiError::InUse { .. })));
    let (v, _) = one_shot(&sock, request("GET", "/version", None).as_bytes());
    assert_eq!(v.status, 200);

    // Dropping removes the socket.
    drop(first);
    assert!(!sock.exists());

    // A regular file is never removed.
    std::fs::write(&sock, b"precious").unwrap();
    let err = spawn().err().unwrap();
    assert!(matches!(err, ApiError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains("api.sock"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
    std::fs::remove_file(&sock).unwrap();

    // Drop leaves alone a socket someone else put at the path since.
    let server = spawn().unwrap();
    std::fs::remove_file(&sock).unwrap();
    let other = UnixListener::bind(&sock).unwrap();
    drop(server);
    assert!(sock.exists());
    drop(other);

    // Too long a path is a bind error naming it.
    let long = dir.0.join("x".repeat(120));
    let (tx, _rx) = mpsc::channel();
    let err = ApiServer::spawn(&long, tx, EventFd::new(0).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, ApiError::Bind { .. }), "{err}");
}

fn curl(sock: &Path, args: &[&str]) -> Option<(u16, String)> {
    let out = std::process::Command::new("curl")
        .arg("--unix-socket")
        .arg(sock)
        .args(["-s", "-S", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    Some((code.parse().unwrap(), body.to_string()))
}

#[test]
fn curl_end_to_end() {
    let mut t = setup("curl", Timeouts::default());
    let Some((code, body)) = curl(&t.sock, &["http://localhost/version"]) else {
        eprintln!("curl is not installed; skipping");
        return;
    };
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["api_version"],
        "1"
    );

    let (code, body) = curl(&t.sock, &["http://localhost/vm"]).unwrap();
    assert_eq!(
        (
            code,
            serde_json::from_str::<Value>(&body).unwrap()["state"].clone()
        ),
        (200, json!("Running"))
    );

    let patch = ["-X", "PATCH", "-H", "Content-Type: application/json"];
    let (code, body) = curl(
        &t.sock,
        &[
            &patch[..],
            &["-d", r#"{"state":"Paused"}"#, "http://localhost/vm"],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!((code, body.as_str()), (204, ""));
    let (code, body) = curl(
        &t.sock,
        &[
            &patch[..],
            &["-d", r#"{"state":"Paused"}"#, "http://localhost/vm"],
        ]
        .concat(),
    )
    .unwrap();
    assert_eq!(code, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"fault_message": "already paused"})
    );

    // A body over 1 KiB with Expect: 100-continue.
    let drives: Vec<Value> = (0..40)
        .map(|i| json!({"drive_id": format!("drive{i}"), "path_on_host": format!("/images/disk-{i}.ext4")}))
        .collect();
    let load = json!({
        "snapshot_path": "/snap/vmstate",
        "mem_backend": {"backend_type": "Uffd", "backend_path": "/snap/memory"},
        "drive_overrides": drives,
    })
    .to_string();
    assert!(load.len() > 1024);
    let (code, body) = curl(
        &t.sock,
        &[
            "-X",
            "PUT",
            "-H",
            "Expect: 100-continue",
            "-d",
            &load,
            "http://localhost/snapshot/load",
        ],
    )
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let echoed: LoadSnapshotParams = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed.drive_overrides.len(), 40);
    assert_eq!(echoed.mem_backend.backend_type, MemBackendType::Uffd);

    let (code, _) = curl(
        &t.sock,
        &["-X", "POST", "-d", "{}", "http://localhost/actions"],
    )
    .unwrap();
    assert_eq!(code, 405);
    let (code, _) = curl(&t.sock, &["http://localhost/snapshot"]).unwrap();
    assert_eq!(code, 404);
    let (code, _) = curl(
        &t.sock,
        &[
            "-X",
            "PUT",
            "-d",
            r#"{"action_type":"Stop"}"#,
            "http://localhost/actions",
        ],
    )
    .unwrap();
    assert_eq!(code, 204);
    t.vmm.take().unwrap().join().unwrap();
    drop(t.server.take());
    assert!(!t.sock.exists());
}
