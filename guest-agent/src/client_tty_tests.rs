//! The host relay against the real server over a Unix socket pair, with
//! socket pairs standing in for the local input and output.

use super::*;
use crate::frame::{read_frame, write_frame};
use crate::freeze::{FreezeController, FsOps};
use crate::proto::WindowSize;
use crate::pty::Pty;
use crate::server::{serve_connection, Agent, ServeError};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
    client_and_server().0
}

/// A client and the thread serving its connection.
fn client_and_server() -> (AgentClient, JoinHandle<std::result::Result<(), ServeError>>) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let agent = Agent::new(FreezeController::new(Box::new(NoFs)));
        serve_connection(&agent, theirs)
    });
    let mut c = AgentClient::from_stream(ours);
    c.set_timeout(Duration::from_secs(20));
    (c, server)
}

/// The exit of a session that must have ended with its program.
fn exited(end: Result<SessionEnd>) -> ExitInfo {
    match end {
        Ok(SessionEnd::Exited(exit)) => exit,
        other => panic!("expected the program's exit, got {other:?}"),
    }
}

/// Serializes the tests that install the process-wide signal watcher (a
/// second one is refused) and raise signals at this process.
static WATCHER: Mutex<()> = Mutex::new(());

fn watcher_lock() -> std::sync::MutexGuard<'static, ()> {
    WATCHER.lock().unwrap_or_else(|e| e.into_inner())
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
    wait_count(seen, needle, 1);
}

/// Waits until `needle` occurs `n` times in the output.
fn wait_count(seen: &Mutex<Vec<u8>>, needle: &str, n: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    while text(seen).matches(needle).count() < n {
        assert!(
            Instant::now() < until,
            "not {n} {needle:?} in {:?}",
            text(seen)
        );
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
        signals: None,
        escape: false,
    };
    let exit = exited(c.exec_tty(&sh(), io));
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
        signals: None,
        escape: false,
    };
    let exit = exited(c.exec_tty(&sh(), io));
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
        signals: None,
        escape: false,
    };
    assert_eq!(exited(c.exec_tty(&sh(), io)).exit_code, Some(4));
}

#[test]
fn window_size_changes_are_forwarded() {
    let _serial = watcher_lock();
    let mut c = client_pair();
    // A local terminal to measure: the slave of a pty of our own.
    let local = Pty::open(WindowSize { rows: 20, cols: 70 }).unwrap();
    let watcher = SignalWatcher::install(Some(local.slave.as_fd())).unwrap();
    assert!(SignalWatcher::install(None).is_err());
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
        signals: Some(&watcher),
        escape: false,
    };
    let exit = exited(c.exec_tty(&req, io));
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
        signals: None,
        escape: false,
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
        signals: None,
        escape: false,
    };
    assert!(matches!(c.exec_tty(&sh(), io), Err(ClientError::Closed)));
    fake.join().unwrap();
    drop(output);
    wait_for(&seen, "hi");
    assert!(matches!(c.ping(), Err(ClientError::Poisoned)));
}

/// A fake agent predating `exec_tty`: every frame it reads, the session's
/// included, gets an unknown-variant error with the frame's id.
fn old_agent_answer(frame: &[u8]) -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(frame).unwrap();
    let (id, op) = (v["id"].as_u64().unwrap(), v["op"].as_str().unwrap());
    serde_json::to_vec(&serde_json::json!({
        "id": id,
        "type": "error",
        "message": format!("invalid request: unknown variant `{op}`, expected one of `ping`, `exec`"),
    }))
    .unwrap()
}

#[test]
fn old_agent_answering_every_session_frame_is_unsupported_and_in_step() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let fake = std::thread::spawn(move || {
        // exec_tty, the input, then the end of input; the three errors go
        // out together, as an old agent working through its backlog sends them.
        let mut answers = Vec::new();
        loop {
            let frame = read_frame(&mut theirs).unwrap().unwrap();
            answers.push(old_agent_answer(&frame));
            let v: serde_json::Value = serde_json::from_slice(&frame).unwrap();
            if v["op"] == "tty_eof" {
                break;
            }
        }
        let mut wire = Vec::new();
        for a in &answers {
            write_frame(&mut wire, a).unwrap();
        }
        theirs.write_all(&wire).unwrap();
        // The connection is still in step: the next request is a ping.
        let ping: serde_json::Value =
            serde_json::from_slice(&read_frame(&mut theirs).unwrap().unwrap()).unwrap();
        assert_eq!(ping["op"], "ping");
        let pong = serde_json::json!({
            "id": ping["id"], "type": "pong", "protocol_version": crate::proto::PROTOCOL_VERSION,
            "agent_version": "0.0.1", "agent_uptime_ms": 1, "boot_uptime_ms": 1,
        });
        write_frame(&mut theirs, &serde_json::to_vec(&pong).unwrap()).unwrap();
        (answers.len(), theirs)
    });
    let mut c = AgentClient::from_stream(ours);
    c.set_timeout(Duration::from_secs(20));
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    input.write_all(b"ls\n").unwrap();
    drop(input);
    let (output, _seen) = collector();
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        signals: None,
        escape: false,
    };
    match c.exec_tty(&sh(), io) {
        Err(e @ ClientError::Unsupported { .. }) => {
            assert!(e.to_string().contains("update the agent"), "{e}");
            assert!(e.to_string().contains("`exec_tty`"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    c.ping().unwrap();
    let (frames, _theirs) = fake.join().unwrap();
    assert!(frames >= 3, "{frames}");
}

#[test]
fn tilde_escapes_in_typed_input() {
    let (mut c, server) = client_and_server();
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    let driver = std::thread::spawn({
        let seen = Arc::clone(&seen);
        move || {
            // Mid-line tildes are ordinary; `~~` at the start of a line
            // types one `~`. Enter in raw mode is CR.
            input.write_all(b"a~~b\r").unwrap();
            input.write_all(b"~~c\r").unwrap();
            // Echoed by the terminal, then written back by cat.
            wait_count(&seen, "~c\n", 2);
            input.write_all(b"~").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            input.write_all(b".").unwrap();
            input
        }
    });
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        signals: None,
        escape: true,
    };
    let cat = ExecTtyRequest {
        argv: vec!["cat".into()],
        ..Default::default()
    };
    assert_eq!(c.exec_tty(&cat, io).unwrap(), SessionEnd::Disconnected);
    let out = text(&seen);
    assert_eq!(out.matches("a~~b\n").count(), 2, "{out}");
    assert!(!out.contains("~~c"), "{out}");
    // The agent saw the connection close (while `c` still exists) and
    // hung the session up, as on any disconnect.
    assert!(server.join().unwrap().is_ok());
    assert!(matches!(c.ping(), Err(ClientError::Poisoned)));
    drop(driver.join().unwrap());
}

#[test]
fn tilde_dot_is_data_when_not_typed() {
    let mut c = client_pair();
    let (mut input, input_peer) = UnixStream::pair().unwrap();
    let (output, seen) = collector();
    input.write_all(b"~.\n").unwrap();
    drop(input);
    let io = TtyIo {
        input: input_peer.as_fd(),
        output: output.as_fd(),
        signals: None,
        escape: false,
    };
    let cat = ExecTtyRequest {
        argv: vec!["cat".into()],
        ..Default::default()
    };
    assert_eq!(exited(c.exec_tty(&cat, io)).exit_code, Some(0));
    wait_for(&seen, "~.\n~.\n");
}

fn lflag(fd: BorrowedFd<'_>) -> libc::tcflag_t {
    // SAFETY: termios is plain old data; all-zero is a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into `t`, which outlives the call.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

fn handler_of(sig: libc::c_int) -> libc::sighandler_t {
    // SAFETY: sigaction is plain old data; all-zero is a valid value.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a query; sigaction only writes `current`, which outlives the call.
    let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut current) };
    assert_eq!(rc, 0);
    current.sa_sigaction
}

/// A local terminal of our own (a pty slave) with a thread collecting what
/// the session shows on it; keys are typed by writing to the master.
fn local_terminal() -> (Pty, Arc<Mutex<Vec<u8>>>) {
    let local = Pty::open(WindowSize { rows: 24, cols: 80 }).unwrap();
    let master = local.master.try_clone().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            let mut fds = [sys::pollfd(Some(master.as_fd()), libc::POLLIN)];
            let _ = sys::poll(&mut fds, Some(Duration::from_millis(100)));
            match sys::read(master.as_fd(), &mut buf) {
                Ok(n @ 1..) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EIO once every slave descriptor is closed.
                _ => break,
            }
        }
    });
    (local, seen)
}

#[test]
fn a_session_on_a_terminal_ends_with_tilde_dot_or_a_signal_and_restores_it() {
    let _serial = watcher_lock();
    let (local, seen) = local_terminal();
    let slave = local.slave.as_fd();
    let cooked = lflag(slave);
    assert_ne!(cooked & libc::ICANON, 0);
    let type_keys = |keys: &[u8]| sys::write_all(local.master.as_fd(), keys).unwrap();

    // `~.` typed at the start of a line ends the session.
    let (mut c, server) = client_and_server();
    std::thread::scope(|s| {
        s.spawn(|| {
            type_keys(b"echo one-$((1+1))\r");
            wait_for(&seen, "one-2\n");
            assert_eq!(lflag(slave) & libc::ICANON, 0, "not in raw mode");
            type_keys(b"~.");
        });
        assert_eq!(
            run_local(&mut c, sh(), slave, slave).unwrap(),
            SessionEnd::Disconnected
        );
    });
    assert_eq!(lflag(slave), cooked);
    assert!(server.join().unwrap().is_ok());

    // SIGTERM (and SIGHUP, SIGQUIT) ends it too; the handlers go with it.
    let before = handler_of(libc::SIGTERM);
    let (mut c, server) = client_and_server();
    std::thread::scope(|s| {
        s.spawn(|| {
            type_keys(b"echo two-$((1+1))\r");
            wait_for(&seen, "two-2\n");
            assert_ne!(handler_of(libc::SIGTERM), before);
            // SAFETY: raising a signal whose handler (installed: the session
            // is running) only records it and writes to a pipe.
            unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        });
        assert_eq!(
            run_local(&mut c, sh(), slave, slave).unwrap(),
            SessionEnd::Signal(libc::SIGTERM)
        );
    });
    assert_eq!(lflag(slave), cooked);
    assert_eq!(handler_of(libc::SIGTERM), before);
    assert!(server.join().unwrap().is_ok());
    assert!(matches!(c.ping(), Err(ClientError::Poisoned)));
}
