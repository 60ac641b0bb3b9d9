//! Host side of `exec_tty`: relays a local input and output descriptor to a
//! program on a terminal in the guest, and the `ssh -t`-like wrapper that
//! wires it to this process's own terminal.
//!
//! A session ends when the program exits, when the person at the terminal
//! types `~.` at the start of a line, or when this process gets SIGTERM,
//! SIGHUP or SIGQUIT; in the last two cases the connection is closed, which
//! makes the agent hang the session up, and the local terminal is restored.

use std::io::{self, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use super::{AgentClient, ClientError, Result};
use crate::conn::FramedSocket;
use crate::frame::FrameError;
use crate::proto::{ExecTtyRequest, ExitInfo, Op, Request, Response, ResponseBody};
use crate::sys;
use crate::terminal::{is_terminal, EscapeScanner, RawMode, Scan, SignalWatcher};

/// Local input waiting to be sent beyond which input is not read.
const INPUT_BACKLOG: usize = 64 * 1024;

/// The same for input typed at a terminal (with the `~.` escape): larger,
/// so that `~.` is still read while a stuck agent takes nothing.
const TERMINAL_INPUT_BACKLOG: usize = 1024 * 1024;

/// The exit code of a command-line client whose session was left with `~.`
/// (255, as ssh's).
pub const DISCONNECT_EXIT_CODE: i32 = 255;

/// How a terminal session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// The program exited, was killed or timed out.
    Exited(ExitInfo),
    /// `~.` was typed at the start of a line: this side closed the
    /// connection, and the agent hangs the session up.
    Disconnected,
    /// This process got the signal (one of
    /// [`crate::terminal::SESSION_END_SIGNALS`]); the connection was closed
    /// as for [`SessionEnd::Disconnected`]. A command-line client exits with
    /// 128 + the signal.
    Signal(i32),
}

/// Where a terminal session's bytes come from and go.
#[derive(Clone, Copy)]
pub struct TtyIo<'a> {
    /// Keystrokes (or a script) for the guest terminal, sent as they are read;
    /// its end of file types the terminal's end-of-file character (Ctrl-D).
    pub input: BorrowedFd<'a>,
    /// Receives everything the guest terminal shows (stdout and stderr merged).
    pub output: BorrowedFd<'a>,
    /// Window-size changes to forward and the signals that end the session,
    /// if a watcher is installed.
    pub signals: Option<&'a SignalWatcher<'a>>,
    /// Whether `input` is typed by a person: `~.` at the start of a line
    /// then ends the session and `~~` sends a `~` (see [`EscapeScanner`]).
    pub escape: bool,
}

impl AgentClient {
    /// Runs `req` on a new terminal in the guest, relaying `io` both ways
    /// until the session ends; returns how. A failure to write the output
    /// (the reader went away) stops the output, not the program. After
    /// [`SessionEnd::Disconnected`] or [`SessionEnd::Signal`] the connection
    /// is closed (the agent hangs the session up) and unusable.
    pub fn exec_tty(&mut self, req: &ExecTtyRequest, io: TtyIo<'_>) -> Result<SessionEnd> {
        let id = self.send(Op::ExecTty(req.clone()))?;
        let mut relay = Relay {
            conn: FramedSocket::new(self.stream.as_fd()),
            id,
            io,
            escape: io.escape.then(EscapeScanner::new),
            session_frames: 0,
            settle_timeout: self.timeout,
            in_step: true,
        };
        let result = relay.relay();
        let in_step = relay.in_step;
        match &result {
            Ok(SessionEnd::Disconnected | SessionEnd::Signal(_)) => {
                self.poisoned = true;
                // Whoever holds this client, the agent must see the end now.
                let _ = self.stream.shutdown(Shutdown::Both);
            }
            // The agent answered and the stream is at a frame boundary.
            Ok(SessionEnd::Exited(_))
            | Err(ClientError::Agent(_) | ClientError::Unsupported { .. })
                if in_step => {}
            _ => self.poisoned = true,
        }
        result
    }
}

/// Runs `req` on a guest terminal wired to this process's stdin and stdout:
/// raw mode and the `~.` escape while stdin is a terminal (restored on
/// return, error, panic, or SIGTERM/SIGHUP/SIGQUIT, which end the session),
/// `TERM` and the window size taken from here unless the request sets them,
/// and window-size changes forwarded.
pub fn run_interactive(client: &mut AgentClient, req: ExecTtyRequest) -> Result<SessionEnd> {
    let (stdin, stdout) = (io::stdin(), io::stdout());
    // Whatever was printed before goes out before the raw relay writes to fd 1.
    let _ = stdout.lock().flush();
    run_local(client, req, stdin.as_fd(), stdout.as_fd())
}

/// [`run_interactive`] on the given local descriptors.
pub(crate) fn run_local(
    client: &mut AgentClient,
    mut req: ExecTtyRequest,
    input: BorrowedFd<'_>,
    output: BorrowedFd<'_>,
) -> Result<SessionEnd> {
    let local_tty = [input, output].into_iter().find(|fd| is_terminal(*fd));
    if req.term.is_none() {
        req.term = std::env::var("TERM").ok().filter(|t| !t.is_empty());
    }
    if req.size.is_none() {
        req.size = local_tty.and_then(sys::window_size);
    }
    // Installed before raw mode and dropped after it: a signal that ends the
    // session always finds the terminal restorable.
    let watcher = match SignalWatcher::install(local_tty) {
        Ok(w) => Some(w),
        Err(e) => {
            let _ = writeln!(
                io::stderr(),
                "vmm: window-size changes will not be forwarded and SIGTERM will not restore \
                 the terminal: {e}"
            );
            None
        }
    };
    let typed = is_terminal(input);
    let _raw = if typed {
        Some(RawMode::enable(input).map_err(|source| ClientError::Io {
            context: "putting the terminal in raw mode",
            source,
        })?)
    } else {
        None
    };
    let io = TtyIo {
        input,
        output,
        signals: watcher.as_ref(),
        escape: typed,
    };
    client.exec_tty(&req, io)
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { context, source }
}

/// One session's relay state.
struct Relay<'a> {
    conn: FramedSocket<'a>,
    id: u64,
    io: TtyIo<'a>,
    /// The `~.` scanner, when the input is typed.
    escape: Option<EscapeScanner>,
    /// Session frames queued so far: an agent without `exec_tty` answers
    /// each with an error of its own.
    session_frames: usize,
    /// How long to wait for those answers.
    settle_timeout: Duration,
    /// After an `error` from the agent: whether the stream was left at a
    /// frame boundary with no stray answers to come (other failures always
    /// leave the connection unusable).
    in_step: bool,
}

impl Relay<'_> {
    /// The session loop: one poll over the connection, the input and the
    /// signal watcher. The connection is always read, so the agent can
    /// always send output; input is read only while little is waiting to
    /// be sent.
    fn relay(&mut self) -> Result<SessionEnd> {
        let mut input_open = true;
        let mut output_ok = true;
        let mut buf = [0u8; 16 * 1024];
        let backlog = match self.escape {
            Some(_) => TERMINAL_INPUT_BACKLOG,
            None => INPUT_BACKLOG,
        };
        let fd = self.conn.fd();
        loop {
            if let Some(sig) = self.end_signal() {
                return Ok(SessionEnd::Signal(sig));
            }
            let read_input = input_open && self.conn.queued() < backlog;
            let conn_events = libc::POLLIN
                | if self.conn.queued() > 0 {
                    libc::POLLOUT
                } else {
                    0
                };
            let mut fds = [
                sys::pollfd(Some(fd), conn_events),
                sys::pollfd(read_input.then_some(self.io.input), libc::POLLIN),
                sys::pollfd(self.io.signals.map(|w| w.fd()), libc::POLLIN),
            ];
            sys::poll(&mut fds, None).map_err(io_err("polling the session"))?;
            if let Some(sig) = self.end_signal() {
                return Ok(SessionEnd::Signal(sig));
            }
            // POLLNVAL too: the read then fails with EBADF instead of polling forever.
            let any_in = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

            if fds[0].revents & any_in != 0 {
                // Frames that arrived just before the agent closed still count.
                let open = self
                    .conn
                    .receive()
                    .map_err(io_err("receiving from the agent"))?;
                while let Some(body) = self.conn.next_frame()? {
                    let resp: Response = serde_json::from_slice(&body).map_err(FrameError::Json)?;
                    match (resp.id, resp.body) {
                        (Some(got), _) if got != self.id => {
                            return Err(ClientError::Protocol(format!(
                                "response id {got} does not match request id {}",
                                self.id
                            )))
                        }
                        (_, ResponseBody::Output { data, .. }) => {
                            if output_ok {
                                match self.write_output(&data) {
                                    Ok(()) => {}
                                    Err(_) if self.end_signal().is_some() => {}
                                    Err(_) => output_ok = false,
                                }
                            }
                            if let Some(sig) = self.end_signal() {
                                return Ok(SessionEnd::Signal(sig));
                            }
                        }
                        (_, ResponseBody::Exit(exit)) => {
                            self.finish()?;
                            return Ok(SessionEnd::Exited(exit));
                        }
                        (_, ResponseBody::Error { message }) => {
                            let err = agent_error(message);
                            self.settle_after_error(&err);
                            return Err(err);
                        }
                        (None, _) => {
                            return Err(ClientError::Protocol(
                                "response without an id during a terminal session".into(),
                            ))
                        }
                        (_, other) => {
                            return Err(ClientError::Protocol(format!(
                                "expected output or exit, got {}",
                                super::body_kind(&other)
                            )))
                        }
                    }
                }
                if !open {
                    return Err(ClientError::Closed);
                }
            }
            if fds[1].revents & any_in != 0 {
                match sys::read(self.io.input, &mut buf) {
                    Ok(0) => {
                        input_open = false;
                        self.end_of_input()?;
                    }
                    Ok(n) => {
                        if self.typed(&buf[..n])? == Scan::Disconnect {
                            return Ok(SessionEnd::Disconnected);
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                        ) => {}
                    // A terminal that went away reads as EIO: treat it as end of input.
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                        input_open = false;
                        self.end_of_input()?;
                    }
                    Err(e) => return Err(io_err("reading the session's input")(e)),
                }
            }
            if let (Some(w), true) = (self.io.signals, fds[2].revents & libc::POLLIN != 0) {
                if let Some(size) = w.take_resize() {
                    self.queue(Op::TtyResize(size))?;
                }
            }
            if self.conn.queued() > 0 {
                self.conn
                    .send_ready()
                    .map_err(io_err("sending to the agent"))?;
            }
        }
    }

    fn end_signal(&self) -> Option<i32> {
        self.io.signals.and_then(SignalWatcher::end_signal)
    }

    /// Queues what was read from the input, through the escape scanner.
    fn typed(&mut self, bytes: &[u8]) -> Result<Scan> {
        let data = match &mut self.escape {
            None => bytes.to_vec(),
            Some(esc) => {
                let mut data = Vec::with_capacity(bytes.len());
                if esc.scan(bytes, &mut data) == Scan::Disconnect {
                    return Ok(Scan::Disconnect);
                }
                data
            }
        };
        if !data.is_empty() {
            self.queue(Op::TtyInput { data })?;
        }
        Ok(Scan::Continue)
    }

    /// The input ended: a `~` held back goes out, then the end of file.
    fn end_of_input(&mut self) -> Result<()> {
        let mut held = Vec::new();
        if let Some(esc) = &mut self.escape {
            esc.finish(&mut held);
        }
        if !held.is_empty() {
            self.queue(Op::TtyInput { data: held })?;
        }
        self.queue(Op::TtyEof)
    }

    /// Writes all of `data` to the local output, giving up when a signal
    /// ends the session (a blocked write is interrupted by it).
    fn write_output(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.end_signal().is_some() {
                return Err(io::ErrorKind::Interrupted.into());
            }
            match sys::write(self.io.output, data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [
                        sys::pollfd(Some(self.io.output), libc::POLLOUT),
                        sys::pollfd(self.io.signals.map(|w| w.fd()), libc::POLLIN),
                    ];
                    sys::poll(&mut fds, None)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn queue(&mut self, op: Op) -> Result<()> {
        self.conn
            .queue(&Request { id: self.id, op })
            .map_err(ClientError::Frame)?;
        self.session_frames += 1;
        Ok(())
    }

    /// After the last frame: input already queued still goes out whole (the
    /// agent drops late session frames), so the connection stays at a frame
    /// boundary; anything the agent sent after its last frame is a protocol
    /// fault.
    fn finish(&mut self) -> Result<()> {
        self.conn.flush().map_err(io_err("sending to the agent"))?;
        if self.conn.buffered() > 0 {
            return Err(ClientError::Protocol(
                "data after the end of the terminal session".into(),
            ));
        }
        Ok(())
    }

    /// After an `error` for the session, which is what is reported: further
    /// errors with its id belong to the same failure and are skipped. An
    /// agent without `exec_tty` answers every session frame sent with one
    /// (unknown op); those are waited for, so the connection stays in step.
    /// Anything else, or a wait that runs out, leaves it out of step.
    fn settle_after_error(&mut self, err: &ClientError) {
        let mut late = match err {
            ClientError::Unsupported { .. } => self.session_frames,
            _ => 0,
        };
        if self.conn.flush().is_err() {
            self.in_step = false;
            return;
        }
        let deadline = Instant::now() + self.settle_timeout;
        loop {
            loop {
                match self.conn.next_frame() {
                    Ok(None) => break,
                    Ok(Some(body)) => match serde_json::from_slice::<Response>(&body) {
                        Ok(Response {
                            id: Some(got),
                            body: ResponseBody::Error { .. },
                        }) if got == self.id => late = late.saturating_sub(1),
                        _ => {
                            self.in_step = false;
                            return;
                        }
                    },
                    Err(_) => {
                        self.in_step = false;
                        return;
                    }
                }
            }
            if late == 0 {
                // A partial frame would be yet another answer.
                self.in_step = self.conn.buffered() == 0;
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [sys::pollfd(Some(self.conn.fd()), libc::POLLIN)];
            if left.is_zero() || sys::poll(&mut fds, Some(left)).is_err() {
                self.in_step = false;
                return;
            }
            if fds[0].revents != 0 && !matches!(self.conn.receive(), Ok(true)) {
                self.in_step = false;
                return;
            }
        }
    }
}

/// An agent predating terminals rejects the op by name.
fn agent_error(message: String) -> ClientError {
    if message.contains("unknown variant `exec_tty`") {
        ClientError::Unsupported {
            what: "terminals (exec_tty)",
            message,
        }
    } else {
        ClientError::Agent(message)
    }
}

#[cfg(test)]
#[path = "client_tty_tests.rs"]
mod tests;
