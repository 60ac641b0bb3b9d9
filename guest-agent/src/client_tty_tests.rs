//! The host relay against the real server over a Unix socket pair, with
//! socket pairs standing in for the local input and output.

use super::*;
use crate::frame::{read_frame, write_frame};
use crate::freeze::{FreezeController, FsOps};
use crate::proto::WindowSize;
use crate::pty::Pty;
use crate::server::{serve_connection, Agent};
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

fn client_pair() -> AgentClient {
    let (ours, theirs) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let agent = Agent::new(FreezeController::new(Box::new(NoFs)));
        serve_connection(&agent, theirs)
    });
    let mut c = AgentClient::from_stream(ours);
    c.set_timeout(Duration::from_secs(20));
    c
}

/// Everything written to the returned socket's peer, collected by a thread.
fn collector() -> (UnixStream, Arc<Mutex<Vec<u8>>>) {
    let (write_end, mut read_end) = UnixStream::pair().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = read_end.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    (write_end, seen)
}

fn text(seen: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&seen.lock().unwrap()).replace('\r', "")
}

fn wait_for(seen: &Mutex<Vec<u8>>, needle: &str) {
    let until = Instant::now() + Duration::from_secs(20);
    while !text(seen).contains(needle) {
        assert!(Instant::now() < until, "no {needle:?} in {:?}", text(seen));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sh() -> ExecTtyRequest {
    ExecTtyRequest {
        argv: vec!["sh".into()],
        ..Default::default()
    }
}

#[test]
fn relays_a_shell_and_returns_its_exit_code() {
    let mut c = client_pair();
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    input.write_all(b"cd /tmp; pwd; exit 7\n").unwrap();
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: None,
    };
    let exit = c.exec_tty(&sh(), io).unwrap();
    assert_eq!(exit.exit_code, Some(7), "{}", text(&seen));
    drop(output);
    // The collector may still be reading what the relay wrote.
    wait_for(&seen, "exit 7\n");
    wait_for(&seen, "/tmp\n");
    let out = text(&seen);
    assert!(
        out.lines()
            .any(|l| l == "/tmp" || l.ends_with("# /tmp") || l.ends_with("$ /tmp")),
        "{out}"
    );
    // The connection is still in step.
    c.ping().unwrap();
}

#[test]
fn end_of_input_ends_the_shell() {
    let mut c = client_pair();
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    input.write_all(b"echo A$((40+2))\n").unwrap();
    drop(input);
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: None,
    };
    let exit = c.exec_tty(&sh(), io).unwrap();
    assert_eq!(exit.exit_code, Some(0));
    wait_for(&seen, "A42");
}

#[test]
fn output_reader_gone_does_not_stop_the_program() {
    let mut c = client_pair();
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, output_peer) = UnixStream::pair().unwrap();
    drop(output_peer);
    input
        .write_all(b"i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; exit 4\n")
        .unwrap();
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: None,
    };
    assert_eq!(c.exec_tty(&sh(), io).unwrap().exit_code, Some(4));
}

/// The only test that installs the (process-wide) SIGWINCH watcher.
#[test]
fn window_size_changes_are_forwarded() {
    let mut c = client_pair();
    // A local terminal to measure: the slave of a pty of our own.
    let local = Pty::open(WindowSize { rows: 20, cols: 70 }).unwrap();
    let watcher = WinchWatcher::install(local.slave.as_fd()).unwrap();
    assert!(WinchWatcher::install(local.slave.as_fd()).is_err());
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    let driver = std::thread::spawn({
        let seen = Arc::clone(&seen);
        let local_master = local.master.try_clone().unwrap();
        move || {
            input.write_all(b"stty size\n").unwrap();
            wait_for(&seen, "20 70\n");
            crate::sys::set_window_size(local_master.as_fd(), WindowSize { rows: 41, cols: 99 })
                .unwrap();
            // SAFETY: raising a signal whose handler only writes to a pipe.
            unsafe { libc::kill(libc::getpid(), libc::SIGWINCH) };
            // The terminal's own SIGWINCH goes to the foreground job; then ask.
            std::thread::sleep(Duration::from_millis(200));
            input.write_all(b"stty size\n").unwrap();
            wait_for(&seen, "41 99\n");
            input.write_all(b"exit 5\n").unwrap();
            input
        }
    });
    let req = ExecTtyRequest {
        size: sys::window_size(local.slave.as_fd()),
        ..sh()
    };
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: Some(&watcher),
    };
    let exit = c.exec_tty(&req, io).unwrap();
    assert_eq!(exit.exit_code, Some(5), "{}", text(&seen));
    drop(driver.join().unwrap());
}

#[test]
fn old_agent_is_reported_as_unsupported() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let _ = read_frame(&mut theirs).unwrap().unwrap();
        write_frame(
            &mut theirs,
            br#"{"id":1,"type":"error","message":"invalid request: unknown variant `exec_tty`, expected one of `ping`, `exec`"}"#,
        )
        .unwrap();
        theirs
    });
    let mut c = AgentClient::from_stream(ours);
    let (_input, input_peer) = UnixStream::pair().unwrap();
    let (output, _seen) = collector();
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: None,
    };
    match c.exec_tty(&sh(), io) {
        Err(e @ ClientError::Unsupported { .. }) => {
            assert!(e.to_string().contains("update the agent"), "{e}")
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(fake.join().unwrap());
}

#[test]
fn agent_vanishing_mid_session_is_an_error() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        let _ = read_frame(&mut theirs).unwrap().unwrap();
        write_frame(
            &mut theirs,
            br#"{"id":1,"type":"output","stream":"stdout","data":"aGk="}"#,
        )
        .unwrap();
    });
    let mut c = AgentClient::from_stream(ours);
    let (_input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        resize: None,
    };
    assert!(matches!(c.exec_tty(&sh(), io), Err(ClientError::Closed)));
    fake.join().unwrap();
    drop(output);
    wait_for(&seen, "hi");
    assert!(matches!(c.ping(), Err(ClientError::Poisoned)));
}
