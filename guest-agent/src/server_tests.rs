//! Server tests at the frame level, over Unix socket pairs.

use super::*;
use crate::freeze::FsOps;
use crate::proto::OutputStream;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Freezes succeed and are recorded; nothing touches real filesystems.
#[derive(Default, Clone)]
struct RecordingFs(Arc<Mutex<Vec<String>>>);

impl FsOps for RecordingFs {
    fn mounts(&self) -> io::Result<String> {
        Ok("/dev/vda / ext4 rw 0 0\n".into())
    }
    fn freeze(&self, mp: &str) -> io::Result<()> {
        self.0.lock().unwrap().push(format!("freeze {mp}"));
        Ok(())
    }
    fn thaw(&self, mp: &str) -> io::Result<()> {
        self.0.lock().unwrap().push(format!("thaw {mp}"));
        Ok(())
    }
}

fn spawn_server() -> (UnixStream, JoinHandle<Result<(), ServeError>>, RecordingFs) {
    let fs = RecordingFs::default();
    let agent = Agent::new(FreezeController::new(Box::new(fs.clone())));
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let h = std::thread::spawn(move || serve_connection(&agent, theirs));
    (ours, h, fs)
}

fn roundtrip(s: &mut UnixStream, body: &[u8]) -> serde_json::Value {
    write_frame(s, body).unwrap();
    let resp = read_frame(s).unwrap().unwrap();
    serde_json::from_slice(&resp).unwrap()
}

fn request(s: &mut UnixStream, id: u64, op: Op) -> Response {
    crate::frame::send_message(s, &Request { id, op }).unwrap();
    crate::frame::recv_message(s).unwrap().unwrap()
}

#[test]
fn ping_reports_versions_and_uptime() {
    let (mut s, h, _) = spawn_server();
    let resp = request(
        &mut s,
        1,
        Op::Ping {
            protocol_version: PROTOCOL_VERSION,
        },
    );
    assert_eq!(resp.id, Some(1));
    match resp.body {
        ResponseBody::Pong(p) => {
            assert_eq!(p.protocol_version, PROTOCOL_VERSION);
            assert_eq!(p.agent_version, AGENT_VERSION);
            assert!(p.boot_uptime_ms > 0);
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(s);
    h.join().unwrap().unwrap();
}

#[test]
fn garbage_gets_error_and_connection_survives() {
    let (mut s, h, _) = spawn_server();
    let v = roundtrip(&mut s, b"\x00\xffnot json");
    assert_eq!(v["type"], "error");
    assert!(v["id"].is_null());
    assert!(v["message"].as_str().unwrap().contains("not valid JSON"));

    let v = roundtrip(&mut s, br#"{"id":5,"op":"reboot"}"#);
    assert_eq!(v["type"], "error");
    assert_eq!(v["id"], 5);
    assert!(v["message"].as_str().unwrap().contains("reboot"));

    let v = roundtrip(&mut s, br#"{"id":6,"op":"exec"}"#);
    assert_eq!(v["type"], "error");
    assert_eq!(v["id"], 6);

    let v = roundtrip(&mut s, br#"[1,2]"#);
    assert_eq!(v["type"], "error");

    let v = roundtrip(&mut s, br#"{"id":7,"op":"ping"}"#);
    assert_eq!(v["type"], "pong");
    assert_eq!(v["id"], 7);
    drop(s);
    h.join().unwrap().unwrap();
}

#[test]
fn oversize_frame_answered_then_closed() {
    let (mut s, h, _) = spawn_server();
    let len = (MAX_FRAME_SIZE as u32) + 1;
    s.write_all(&len.to_be_bytes()).unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&read_frame(&mut s).unwrap().unwrap()).unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["message"].as_str().unwrap().contains("exceeds"));
    assert!(
        read_frame(&mut s).unwrap().is_none(),
        "connection not closed"
    );
    assert!(matches!(
        h.join().unwrap(),
        Err(ServeError::Frame(FrameError::TooLarge { .. }))
    ));
}

#[test]
fn truncated_frame_ends_connection_without_panic() {
    let (mut s, h, _) = spawn_server();
    s.write_all(&100u32.to_be_bytes()).unwrap();
    s.write_all(b"{\"id\":").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(
        h.join().unwrap(),
        Err(ServeError::Frame(FrameError::Truncated {
            got: 6,
            expected: 100
        }))
    ));
}

#[test]
fn exec_errors_are_error_frames() {
    let (mut s, h, _) = spawn_server();
    let resp = request(&mut s, 3, Op::Exec(ExecRequest::new(["/no/such/program"])));
    assert_eq!(resp.id, Some(3));
    match resp.body {
        ResponseBody::Error { message } => assert!(message.contains("/no/such/program")),
        other => panic!("unexpected {other:?}"),
    }
    let mut req = ExecRequest::new(["/no/such/program"]);
    req.stream = true;
    let resp = request(&mut s, 4, Op::Exec(req));
    assert!(matches!(resp.body, ResponseBody::Error { .. }));
    drop(s);
    h.join().unwrap().unwrap();
}

#[test]
fn streaming_exec_frames_in_order() {
    let (mut s, h, _) = spawn_server();
    let mut req = ExecRequest::new(["sh", "-c", "echo a; sleep 0.1; echo b >&2; exit 4"]);
    req.stream = true;
    crate::frame::send_message(
        &mut s,
        &Request {
            id: 9,
            op: Op::Exec(req),
        },
    )
    .unwrap();
    let mut frames = Vec::new();
    loop {
        let r: Response = crate::frame::recv_message(&mut s).unwrap().unwrap();
        assert_eq!(r.id, Some(9));
        let end = matches!(r.body, ResponseBody::Exit(_));
        frames.push(r.body);
        if end {
            break;
        }
    }
    assert_eq!(
        frames[..2],
        [
            ResponseBody::Output {
                stream: OutputStream::Stdout,
                data: b"a\n".to_vec()
            },
            ResponseBody::Output {
                stream: OutputStream::Stderr,
                data: b"b\n".to_vec()
            },
        ]
    );
    match &frames[2] {
        ResponseBody::Exit(e) => assert_eq!(e.exit_code, Some(4)),
        other => panic!("unexpected {other:?}"),
    }
    drop(s);
    h.join().unwrap().unwrap();
}

#[test]
fn freeze_blocks_write_file_until_thaw() {
    let (mut s, h, fs) = spawn_server();
    let path = std::env::temp_dir().join(format!("ga-server-frozen-{}", std::process::id()));
    let p = path.to_str().unwrap().to_string();
    let write = |s: &mut UnixStream, id| {
        request(
            s,
            id,
            Op::WriteFile(crate::proto::WriteFileRequest {
                path: p.clone(),
                data: b"x".to_vec(),
                mode: 0o600,
            }),
        )
    };
    let r = request(&mut s, 1, Op::Freeze(Default::default()));
    assert_eq!(
        r.body,
        ResponseBody::Frozen {
            mountpoints: vec!["/".into()]
        }
    );
    let r = write(&mut s, 2);
    assert!(matches!(r.body, ResponseBody::Error { ref message } if message.contains("frozen")));
    assert!(!path.exists());
    let r = request(&mut s, 3, Op::Thaw);
    assert_eq!(
        r.body,
        ResponseBody::Thawed {
            mountpoints: vec!["/".into()]
        }
    );
    let r = write(&mut s, 4);
    assert_eq!(r.body, ResponseBody::FileWritten { bytes: 1 });
    assert_eq!(*fs.0.lock().unwrap(), vec!["freeze /", "thaw /"]);
    std::fs::remove_file(&path).unwrap();
    drop(s);
    h.join().unwrap().unwrap();
}

#[test]
fn sync_answers() {
    let (mut s, h, _) = spawn_server();
    assert_eq!(request(&mut s, 1, Op::Sync).body, ResponseBody::Synced);
    drop(s);
    h.join().unwrap().unwrap();
}
