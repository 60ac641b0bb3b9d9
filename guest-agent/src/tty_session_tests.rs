//! Terminal sessions on this host, at the frame level: the real server on one
//! end of a Unix socket pair, the test speaking the protocol on the other.

use super::*;
use crate::frame::{recv_message, send_message};
use crate::freeze::{FreezeController, FsOps};
use crate::proto::{PingInfo, Request};
use crate::server::{serve_connection, Agent, ServeError};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

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

/// The test's end of a connection to a real server thread.
struct Peer {
    sock: UnixStream,
    server: Option<JoinHandle<Result<(), ServeError>>>,
    /// Terminal output received so far.
    output: Vec<u8>,
}

impl Peer {
    fn new() -> Self {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let server = std::thread::spawn(move || {
            let agent = Agent::new(FreezeController::new(Box::new(NoFs)));
            serve_connection(&agent, theirs)
        });
        Self {
            sock: ours,
            server: Some(server),
            output: Vec::new(),
        }
    }

    fn send(&mut self, id: u64, op: Op) {
        send_message(&mut self.sock, &Request { id, op }).unwrap();
    }

    fn start(&mut self, id: u64, argv: &[&str]) {
        self.start_with(
            id,
            ExecTtyRequest {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        );
    }

    fn start_with(&mut self, id: u64, req: ExecTtyRequest) {
        self.send(id, Op::ExecTty(req));
    }

    fn input(&mut self, id: u64, text: &str) {
        self.send(
            id,
            Op::TtyInput {
                data: text.as_bytes().to_vec(),
            },
        );
    }

    fn recv(&mut self) -> Response {
        recv_message(&mut self.sock)
            .unwrap()
            .expect("server closed the connection")
    }

    /// Collects output until `needle` appears in it.
    fn wait_for(&mut self, id: u64, needle: &str) {
        while !self.text().contains(needle) {
            match self.recv() {
                Response {
                    id: Some(got),
                    body: ResponseBody::Output { stream, data },
                } if got == id => {
                    assert_eq!(stream, OutputStream::Stdout);
                    self.output.extend_from_slice(&data);
                }
                other => panic!("waiting for {needle:?} in {:?}: got {other:?}", self.text()),
            }
        }
    }

    /// Collects output until the exit frame.
    fn wait_exit(&mut self, id: u64) -> ExitInfo {
        loop {
            match self.recv() {
                Response {
                    id: Some(got),
                    body: ResponseBody::Output { data, .. },
                } if got == id => self.output.extend_from_slice(&data),
                Response {
                    id: Some(got),
                    body: ResponseBody::Exit(exit),
                } if got == id => return exit,
                other => panic!("waiting for exit after {:?}: got {other:?}", self.text()),
            }
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output).replace('\r', "")
    }

    fn ping(&mut self, id: u64) -> PingInfo {
        self.send(
            id,
            Op::Ping {
                protocol_version: 1,
            },
        );
        match self.recv() {
            Response {
                id: Some(got),
                body: ResponseBody::Pong(p),
            } if got == id => p,
            other => panic!("expected pong, got {other:?}"),
        }
    }

    /// Closes our end and returns how the server's connection ended.
    fn hang_up(mut self) -> Result<(), ServeError> {
        let server = self.server.take().unwrap();
        drop(self);
        server.join().unwrap()
    }
}

/// Whether some line of terminal output is `line`, alone or after a prompt.
/// Input typed ahead is echoed before the shell prints its prompt, so the
/// prompt ends up in front of the command's output.
fn has_line(text: &str, line: &str) -> bool {
    text.lines().map(str::trim_end).any(|l| {
        l == line || l.ends_with(&format!("# {line}")) || l.ends_with(&format!("$ {line}"))
    })
}

/// Whether `pid` runs (a zombie waiting for whoever inherited it does not).
fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

#[test]
fn shell_state_persists_and_exit_code_returns() {
    let mut p = Peer::new();
    p.start(1, &["sh"]);
    p.input(1, "cd /tmp; pwd; exit 7\n");
    let exit = p.wait_exit(1);
    assert_eq!(exit.exit_code, Some(7), "{}", p.text());
    assert!(!exit.timed_out);
    assert!(has_line(&p.text(), "/tmp"), "{}", p.text());
    // The connection serves ordinary requests afterwards, and late session
    // frames are dropped without an answer.
    p.input(1, "late\n");
    p.send(1, Op::TtyEof);
    assert_eq!(p.ping(2).protocol_version, crate::proto::PROTOCOL_VERSION);
    p.hang_up().unwrap();
}

#[test]
fn terminal_environment_and_size() {
    let mut p = Peer::new();
    let cwd = std::env::temp_dir().canonicalize().unwrap();
    p.start_with(
        1,
        ExecTtyRequest {
            argv: vec!["sh".into()],
            env: vec!["FOO=bar baz".into()],
            cwd: Some(cwd.to_string_lossy().into_owned()),
            term: Some("vt220".into()),
            size: Some(WindowSize {
                rows: 30,
                cols: 100,
            }),
            timeout_ms: None,
        },
    );
    p.input(1, "echo \"T=$TERM:$FOO:$(pwd -P)\"; tty; stty size\n");
    p.wait_for(1, "30 100\n");
    let text = p.text();
    assert!(
        has_line(&text, &format!("T=vt220:bar baz:{}", cwd.display())),
        "{text}"
    );
    assert!(text.contains("/dev/pts/"), "{text}");

    // A resize reaches the terminal (and SIGWINCH the foreground group).
    p.send(
        1,
        Op::TtyResize(WindowSize {
            rows: 50,
            cols: 132,
        }),
    );
    p.input(1, "stty size\n");
    p.wait_for(1, "50 132\n");
    p.input(1, "exit\n");
    assert_eq!(p.wait_exit(1).exit_code, Some(0));
}

#[test]
fn ctrl_c_interrupts_and_signals_are_reported() {
    let mut p = Peer::new();
    p.start(1, &["sleep", "30"]);
    // The line discipline turns ^C into SIGINT for the foreground group.
    p.input(1, "\x03");
    let t = Instant::now();
    let exit = p.wait_exit(1);
    assert_eq!(exit.signal, Some(libc::SIGINT));
    assert_eq!(exit.exit_code, None);
    assert!(t.elapsed() < Duration::from_secs(10));

    p.start(2, &["sh", "-c", "kill -TERM $$"]);
    assert_eq!(p.wait_exit(2).signal, Some(libc::SIGTERM));
}

#[test]
fn end_of_input_types_ctrl_d() {
    let mut p = Peer::new();
    p.start(1, &["cat"]);
    p.input(1, "hello\n");
    p.send(1, Op::TtyEof);
    let exit = p.wait_exit(1);
    assert_eq!(exit.exit_code, Some(0));
    // Echoed by the terminal, then written back by cat.
    assert_eq!(p.text().matches("hello").count(), 2, "{}", p.text());
}

#[test]
fn timeout_kills_and_is_reported() {
    let mut p = Peer::new();
    p.start_with(
        1,
        ExecTtyRequest {
            argv: vec!["sleep".into(), "30".into()],
            timeout_ms: Some(200),
            ..Default::default()
        },
    );
    let t = Instant::now();
    let exit = p.wait_exit(1);
    assert!(exit.timed_out);
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn failures_to_start_are_errors_and_the_connection_survives() {
    let mut p = Peer::new();
    p.start(1, &["/nonexistent/program"]);
    match p.recv().body {
        ResponseBody::Error { message } => {
            assert!(message.contains("/nonexistent/program"), "{message}");
            assert!(message.contains("/dev/pts/"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    p.ping(2);
}

#[test]
fn other_requests_are_refused_during_a_session() {
    let mut p = Peer::new();
    p.start(1, &["cat"]);
    p.send(2, Op::Sync);
    loop {
        match p.recv() {
            Response {
                id: Some(2),
                body: ResponseBody::Error { message },
            } => {
                assert!(message.contains("terminal session"), "{message}");
                break;
            }
            Response {
                body: ResponseBody::Output { .. },
                ..
            } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    p.send(1, Op::TtyEof);
    assert_eq!(p.wait_exit(1).exit_code, Some(0));
}

#[test]
fn host_disconnect_kills_the_session() {
    let mut p = Peer::new();
    // The leader ignores the hang-up: only SIGKILL after the grace period
    // ends it. The background job has a process group of its own (`set -m`).
    p.start(
        1,
        &[
            "sh",
            "-c",
            "set -m; sleep 1000 & echo BG=$!; trap '' HUP; echo PID=$$; \
             while :; do sleep 1; done",
        ],
    );
    p.wait_for(1, "PID=");
    p.wait_for(1, "\n");
    let text = p.text();
    let find = |key: &str| -> libc::pid_t {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    let (pid, bg) = (find("PID="), find("BG="));
    assert!(alive(pid) && alive(bg));
    let t = Instant::now();
    // A clean close by the host ends the connection without an error.
    p.hang_up().unwrap();
    assert!(t.elapsed() < HANGUP_GRACE + Duration::from_secs(3));
    // Killed and reaped by the agent: not even a zombie is left.
    assert!(!alive(pid), "pid {pid} survived the hang-up");
    // The job was re-parented away from us; give it a moment to die.
    let until = Instant::now() + Duration::from_secs(5);
    while alive(bg) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(bg), "background job {bg} survived the hang-up");
}

#[test]
fn login_shell_by_default() {
    let mut p = Peer::new();
    p.start_with(1, ExecTtyRequest::default());
    p.input(1, "echo \"zero=$0\"; exit 3\n");
    let exit = p.wait_exit(1);
    assert_eq!(exit.exit_code, Some(3), "{}", p.text());
    // argv[0] starting with '-' is what makes a shell a login shell.
    assert!(p.text().contains("zero=-"), "{}", p.text());
}

#[test]
fn timeout_kills_the_whole_session() {
    let mut p = Peer::new();
    // Two background jobs in process groups of their own (`set -m`), one of
    // them deaf to the hang-up: a timeout leaves neither running.
    p.start_with(
        1,
        ExecTtyRequest {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "set -m; sleep 1000 & echo BG=$!; (trap '' HUP; exec sleep 1000) & \
                 echo NOHUP=$!; echo READY; while :; do sleep 1; done"
                    .into(),
            ],
            timeout_ms: Some(1500),
            ..Default::default()
        },
    );
    p.wait_for(1, "READY");
    let text = p.text();
    let find = |key: &str| -> libc::pid_t {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {text:?}"))
    };
    let jobs = [find("BG="), find("NOHUP=")];
    assert!(jobs.iter().all(|&pid| alive(pid)));
    let exit = p.wait_exit(1);
    assert!(exit.timed_out, "{exit:?}");
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    // Orphaned jobs are reaped by whoever inherited them; allow a moment.
    let until = Instant::now() + Duration::from_secs(5);
    while jobs.iter().any(|&pid| alive(pid)) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let survivors: Vec<_> = jobs.iter().filter(|&&pid| alive(pid)).collect();
    for &&pid in &survivors {
        crate::pty::signal_process(pid, libc::SIGKILL);
    }
    assert!(
        survivors.is_empty(),
        "jobs {survivors:?} survived the timeout"
    );
    p.ping(2);
}

#[test]
fn refused_requests_cannot_grow_the_agent_queue_without_bound() {
    use crate::frame::encode_frame;
    use std::io::Write;
    use std::os::fd::AsFd;

    let mut p = Peer::new();
    p.start(1, &["cat"]);
    // Requests the session refuses, each answered with an error more than
    // twice its size; the test reads no answer until the agent stops taking
    // requests, which it must do once its queue is full.
    const PINGS: u64 = 80_000;
    let mut wire = Vec::new();
    for id in 0..PINGS {
        let body = serde_json::to_vec(&Request {
            id: 1000 + id,
            op: Op::Ping {
                protocol_version: 1,
            },
        })
        .unwrap();
        wire.extend_from_slice(&encode_frame(&body).unwrap());
    }
    let mut sent = 0;
    let mut last_progress = Instant::now();
    while sent < wire.len() && last_progress.elapsed() < Duration::from_millis(500) {
        match sys::send_nonblocking(p.sock.as_fd(), &wire[sent..]) {
            Ok(n) => {
                sent += n;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fds = [sys::pollfd(Some(p.sock.as_fd()), libc::POLLOUT)];
                sys::poll(&mut fds, Some(Duration::from_millis(50))).unwrap();
            }
            Err(e) => panic!("sending: {e}"),
        }
    }
    assert!(
        sent < wire.len() / 2,
        "the agent took {sent} of {} bytes of requests without their answers being read",
        wire.len()
    );
    // Reading the answers lets the agent go on: every request is answered.
    let mut writer = p.sock.try_clone().unwrap();
    let rest = wire.split_off(sent);
    let writer = std::thread::spawn(move || writer.write_all(&rest).unwrap());
    for want in 0..PINGS {
        match p.recv() {
            Response {
                id: Some(got),
                body: ResponseBody::Error { message },
            } if got == 1000 + want => assert!(message.contains("refused"), "{message}"),
            other => panic!("answer {want}: unexpected {other:?}"),
        }
    }
    writer.join().unwrap();
    p.send(1, Op::TtyEof);
    assert_eq!(p.wait_exit(1).exit_code, Some(0));
    p.ping(2);
}

#[test]
fn oversize_frame_started_during_a_session_is_refused_after_it() {
    use std::io::Write;

    let mut p = Peer::new();
    p.start(1, &["sh", "-c", "sleep 0.3"]);
    // Half of a header announcing 4 GiB while the program runs; after the
    // exit the agent reads on to the next frame boundary and must refuse
    // the length instead of waiting for the body.
    p.sock.write_all(&[0xff, 0xff]).unwrap();
    assert_eq!(p.wait_exit(1).exit_code, Some(0));
    p.sock.write_all(&[0xff, 0xff, b'x']).unwrap();
    match p.recv() {
        Response {
            id: None,
            body: ResponseBody::Error { message },
        } => assert!(message.contains("exceeds the maximum"), "{message}"),
        other => panic!("unexpected {other:?}"),
    }
    let server = p.server.take().unwrap();
    match server.join().unwrap() {
        Err(ServeError::Frame(FrameError::TooLarge { len, .. })) => {
            assert_eq!(len, u64::from(u32::MAX))
        }
        other => panic!("unexpected {other:?}"),
    }
    // Closed (reset, as the agent left a byte unread): nothing more comes.
    assert!(!matches!(
        recv_message::<_, Response>(&mut p.sock),
        Ok(Some(_))
    ));
}
