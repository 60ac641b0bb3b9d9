//! Client tests against the real server over Unix sockets, and against a fake
//! hybrid-vsock endpoint for the handshake.

use super::*;
use crate::frame::{read_frame, write_frame};
use crate::freeze::{FreezeController, FsOps};
use crate::server::{serve_connection, Agent};
use std::io::Cursor;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ga-client-{tag}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Refuses to touch real filesystems.
struct NoFs;

impl FsOps for NoFs {
    fn mounts(&self) -> io::Result<String> {
        Ok(String::new())
    }
    fn freeze(&self, _: &str) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
    fn thaw(&self, _: &str) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }
}

fn test_agent() -> Arc<Agent> {
    Arc::new(Agent::new(FreezeController::new(Box::new(NoFs))))
}

fn client_pair() -> AgentClient {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let agent = test_agent();
    std::thread::spawn(move || serve_connection(&agent, theirs));
    let mut c = AgentClient::from_stream(ours);
    c.set_timeout(Duration::from_secs(20));
    c
}

/// A fake VMM hybrid socket: answers each connection with `answer` (if the
/// CONNECT line is right) and then serves the agent protocol.
fn fake_hybrid(path: &Path, answer: &'static str, accept: usize) -> JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let agent = test_agent();
    std::thread::spawn(move || {
        for _ in 0..accept {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            assert_eq!(line, b"CONNECT 52");
            s.write_all(answer.as_bytes()).unwrap();
            let agent = Arc::clone(&agent);
            std::thread::spawn(move || serve_connection(&agent, s));
        }
    })
}

#[test]
fn handshake_parsing() {
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let run = |answer: &[u8]| {
        let mut d = Duplex {
            input: Cursor::new(answer.to_vec()),
            output: Vec::new(),
        };
        let r = hybrid_handshake(&mut d, 52);
        assert_eq!(d.output, b"CONNECT 52\n");
        (r, d.input.position())
    };
    // Only the line is consumed; agent bytes after it stay unread.
    assert_eq!(run(b"OK 1073741824\n\x00\x00"), (Ok(1_073_741_824), 14));
    assert_eq!(run(b"OK 7\r\n").0, Ok(7));
    let (r, _) = run(b"ERR no listener\n");
    assert!(r.unwrap_err().contains("ERR no listener"));
    let (r, _) = run(b"OK notanumber\n");
    assert!(r.unwrap_err().contains("notanumber"));
    let (r, _) = run(b"");
    assert!(r.unwrap_err().contains("connection closed"));
    let (r, _) = run(b"OK 1");
    assert!(r.unwrap_err().contains("\"OK 1\""));
    let (r, _) = run(&[b'x'; 200]);
    assert!(r.unwrap_err().contains("too long"));
}

#[test]
fn connect_hybrid_and_errors() {
    let path = unique_path("ok");
    let server = fake_hybrid(&path, "OK 1073741824\n", 1);
    let mut c = AgentClient::connect_hybrid(&path, 52, Duration::from_secs(10)).unwrap();
    assert_eq!(c.ping().unwrap().protocol_version, PROTOCOL_VERSION);
    server.join().unwrap();
    std::fs::remove_file(&path).unwrap();

    let path = unique_path("bad");
    let server = fake_hybrid(&path, "NOPE\n", 1);
    match AgentClient::connect_hybrid(&path, 52, Duration::from_secs(10)) {
        Err(ClientError::Handshake { reason, port, .. }) => {
            assert_eq!(port, 52);
            assert!(reason.contains("NOPE"), "{reason}");
        }
        other => panic!("unexpected {:?}", other.err()),
    }
    server.join().unwrap();
    std::fs::remove_file(&path).unwrap();

    let missing = unique_path("missing");
    assert!(matches!(
        AgentClient::connect_hybrid(&missing, 52, Duration::from_secs(1)),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn wait_ready_retries_until_socket_appears() {
    let path = unique_path("late");
    let p2 = path.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        fake_hybrid(&p2, "OK 1\n", 1).join().unwrap();
    });
    let t = Instant::now();
    let (mut c, info) = wait_ready(&path, 52, Instant::now() + Duration::from_secs(10)).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(250));
    assert_eq!(info.agent_version, crate::proto::AGENT_VERSION);
    c.sync().unwrap();
    starter.join().unwrap();
    std::fs::remove_file(&path).unwrap();

    let never = unique_path("never");
    match wait_ready(&never, 52, Instant::now() + Duration::from_millis(200)) {
        Err(ClientError::NotReady { last, .. }) => {
            assert!(matches!(*last, ClientError::Connect { .. }))
        }
        other => panic!("unexpected {:?}", other.err()),
    }
}

#[test]
fn exec_collect_cases() {
    let mut c = client_pair();
    let out = c.exec(&ExecRequest::new(["echo", "hi"])).unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert!(out.exit.success());

    let out = c.exec(&ExecRequest::new(["sh", "-c", "exit 3"])).unwrap();
    assert_eq!(out.exit.exit_code, Some(3));

    let mut req = ExecRequest::new(["sh", "-c", "cat; echo \"$GREETING\" >&2; pwd"]);
    req.stdin = b"from stdin\n".to_vec();
    req.env = vec!["GREETING=hello there".into()];
    req.cwd = Some("/".into());
    let out = c.exec(&req).unwrap();
    assert_eq!(out.stdout, b"from stdin\n/\n");
    assert_eq!(out.stderr, b"hello there\n");

    let mut req = ExecRequest::new(["sleep", "30"]);
    req.timeout_ms = Some(100);
    let t = Instant::now();
    let out = c.exec(&req).unwrap();
    assert!(out.exit.timed_out);
    assert!(t.elapsed() < Duration::from_secs(5));

    // Agent-side failures are errors, and the connection stays usable.
    match c.exec(&ExecRequest::new(["/no/such/bin"])) {
        Err(ClientError::Agent(m)) => assert!(m.contains("/no/such/bin")),
        other => panic!("unexpected {other:?}"),
    }
    c.ping().unwrap();
}

#[test]
fn exec_streaming_delivers_chunks_then_exit() {
    let mut c = client_pair();
    let mut seen = Vec::new();
    let req = ExecRequest::new([
        "sh",
        "-c",
        "echo 1; sleep 0.1; echo 2 >&2; sleep 0.1; echo 3; exit 5",
    ]);
    let exit = c
        .exec_streaming(&req, |s, d| seen.push((s, d.to_vec())))
        .unwrap();
    assert_eq!(exit.exit_code, Some(5));
    assert_eq!(
        seen,
        vec![
            (OutputStream::Stdout, b"1\n".to_vec()),
            (OutputStream::Stderr, b"2\n".to_vec()),
            (OutputStream::Stdout, b"3\n".to_vec()),
        ]
    );
    // Next call on the same connection still lines up.
    assert_eq!(
        c.exec(&ExecRequest::new(["true"])).unwrap().exit.exit_code,
        Some(0)
    );
}

#[test]
fn file_round_trip_and_freeze_errors() {
    let mut c = client_pair();
    let path = unique_path("file");
    let p = path.to_str().unwrap();
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    assert_eq!(c.write_file(p, &data, 0o640).unwrap(), 100_000);
    assert_eq!(c.read_file(p, None).unwrap(), data);
    assert!(matches!(
        c.read_file(p, Some(10)),
        Err(ClientError::Agent(_))
    ));
    std::fs::remove_file(&path).unwrap();

    // NoFs refuses to freeze; the error text carries the mountpoint.
    match c.freeze(Some(vec!["/mnt".into()]), Duration::from_secs(5)) {
        Err(ClientError::Agent(m)) => assert!(m.contains("/mnt"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(c.thaw().unwrap(), Vec::<String>::new());
}

#[test]
fn mismatched_id_and_eof_poison_the_client() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let _ = read_frame(&mut theirs).unwrap().unwrap();
        write_frame(&mut theirs, br#"{"id":999,"type":"synced"}"#).unwrap();
    });
    let mut c = AgentClient::from_stream(ours);
    assert!(matches!(c.sync(), Err(ClientError::Protocol(_))));
    assert!(matches!(c.sync(), Err(ClientError::Poisoned)));
    fake.join().unwrap();

    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let _ = read_frame(&mut theirs).unwrap().unwrap();
    });
    let mut c = AgentClient::from_stream(ours);
    assert!(matches!(c.ping(), Err(ClientError::Closed)));
    fake.join().unwrap();

    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let _ = read_frame(&mut theirs).unwrap().unwrap();
        let body = format!(
            r#"{{"id":1,"type":"pong","protocol_version":{},"agent_version":"x","agent_uptime_ms":0,"boot_uptime_ms":0}}"#,
            PROTOCOL_VERSION + 1
        );
        write_frame(&mut theirs, body.as_bytes()).unwrap();
    });
    let mut c = AgentClient::from_stream(ours);
    assert!(matches!(c.ping(), Err(ClientError::VersionMismatch { .. })));
    fake.join().unwrap();
}

#[test]
fn read_timeout_is_reported() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let mut c = AgentClient::from_stream(ours);
    c.set_timeout(Duration::from_millis(100));
    let t = Instant::now();
    assert!(matches!(
        c.ping(),
        Err(ClientError::Frame(FrameError::Io(_)))
    ));
    assert!(t.elapsed() < Duration::from_secs(5));
}
