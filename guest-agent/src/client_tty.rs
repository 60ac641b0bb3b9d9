//! Host side of `exec_tty`: relays a local input and output descriptor to a
//! program on a terminal in the guest, and the `ssh -t`-like wrapper that
//! wires it to this process's own terminal.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};

use super::{AgentClient, ClientError, Result};
use crate::conn::FramedSocket;
use crate::frame::FrameError;
use crate::proto::{ExecTtyRequest, ExitInfo, Op, Request, Response, ResponseBody};
use crate::sys;
use crate::terminal::{is_terminal, RawMode, WinchWatcher};

/// Local input waiting to be sent beyond which input is not read.
const INPUT_BACKLOG: usize = 64 * 1024;

/// Where a terminal session's bytes come from and go.
#[derive(Clone, Copy)]
pub struct TtyIo<'a> {
    /// Keystrokes (or a script) for the guest terminal, sent as they are read;
    /// its end of file types the terminal's end-of-file character (Ctrl-D).
    pub input: BorrowedFd<'a>,
    /// Receives everything the guest terminal shows (stdout and stderr merged).
    pub output: BorrowedFd<'a>,
    /// Window-size changes to forward, if the local side is a terminal.
    pub resize: Option<&'a WinchWatcher<'a>>,
}

impl AgentClient {
    /// Runs `req` on a new terminal in the guest, relaying `io` both ways
    /// until the program exits; returns how it ended. A failure to write the
    /// output (the reader went away) stops the output, not the program.
    pub fn exec_tty(&mut self, req: &ExecTtyRequest, io: TtyIo<'_>) -> Result<ExitInfo> {
        let id = self.send(Op::ExecTty(req.clone()))?;
        let result = relay(self.stream.as_fd(), id, io);
        match &result {
            // The agent answered and the stream is at a frame boundary.
            Ok(_) | Err(ClientError::Agent(_) | ClientError::Unsupported { .. }) => {}
            Err(_) => self.poisoned = true,
        }
        result
    }
}

/// Runs `req` on a guest terminal wired to this process's stdin and stdout:
/// raw mode while stdin is a terminal (restored on return, error or panic),
/// `TERM` and the window size taken from here unless the request sets them,
/// and window-size changes forwarded.
pub fn run_interactive(client: &mut AgentClient, mut req: ExecTtyRequest) -> Result<ExitInfo> {
    let (stdin, stdout) = (io::stdin(), io::stdout());
    // Whatever was printed before goes out before the raw relay writes to fd 1.
    let _ = stdout.lock().flush();
    let (input, output) = (stdin.as_fd(), stdout.as_fd());
    let local_tty = [input, output].into_iter().find(|fd| is_terminal(*fd));
    if req.term.is_none() {
        req.term = std::env::var("TERM").ok().filter(|t| !t.is_empty());
    }
    if req.size.is_none() {
        req.size = local_tty.and_then(sys::window_size);
    }
    let watcher = match local_tty.map(WinchWatcher::install) {
        Some(Ok(w)) => Some(w),
        Some(Err(e)) => {
            eprintln!("vmm: window-size changes will not be forwarded: {e}");
            None
        }
        None => None,
    };
    let _raw = if is_terminal(input) {
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
        resize: watcher.as_ref(),
    };
    client.exec_tty(&req, io)
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { context, source }
}

/// The session loop: one poll over the connection, the input and the
/// window-size watcher. The connection is always read, so the agent can
/// always send output; input is read only while little is waiting to be sent.
fn relay(fd: BorrowedFd<'_>, id: u64, io: TtyIo<'_>) -> Result<ExitInfo> {
    let mut conn = FramedSocket::new(fd);
    let mut input_open = true;
    let mut output_ok = true;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let read_input = input_open && conn.queued() < INPUT_BACKLOG;
        let conn_events = libc::POLLIN | if conn.queued() > 0 { libc::POLLOUT } else { 0 };
        let mut fds = [
            sys::pollfd(Some(fd), conn_events),
            sys::pollfd(read_input.then_some(io.input), libc::POLLIN),
            sys::pollfd(io.resize.map(|w| w.fd()), libc::POLLIN),
        ];
        sys::poll(&mut fds, None).map_err(io_err("polling the session"))?;
        // POLLNVAL too: the read then fails with EBADF instead of polling forever.
        let any_in = libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;

        if fds[0].revents & any_in != 0 {
            // Frames that arrived just before the agent closed still count.
            let open = conn.receive().map_err(io_err("receiving from the agent"))?;
            while let Some(body) = conn.next_frame()? {
                let resp: Response = serde_json::from_slice(&body).map_err(FrameError::Json)?;
                match (resp.id, resp.body) {
                    (Some(got), _) if got != id => {
                        return Err(ClientError::Protocol(format!(
                            "response id {got} does not match request id {id}"
                        )))
                    }
                    (_, ResponseBody::Output { data, .. }) => {
                        if output_ok && sys::write_all(io.output, &data).is_err() {
                            output_ok = false;
                        }
                    }
                    (_, ResponseBody::Exit(exit)) => {
                        finish(&mut conn)?;
                        return Ok(exit);
                    }
                    (_, ResponseBody::Error { message }) => {
                        finish(&mut conn)?;
                        return Err(agent_error(message));
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
            match sys::read(io.input, &mut buf) {
                Ok(0) => {
                    input_open = false;
                    queue(&mut conn, id, Op::TtyEof)?;
                }
                Ok(n) => queue(
                    &mut conn,
                    id,
                    Op::TtyInput {
                        data: buf[..n].to_vec(),
                    },
                )?,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                    ) => {}
                // A terminal that went away reads as EIO: treat it as end of input.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    input_open = false;
                    queue(&mut conn, id, Op::TtyEof)?;
                }
                Err(e) => return Err(io_err("reading the session's input")(e)),
            }
        }
        if let (Some(w), true) = (io.resize, fds[2].revents & libc::POLLIN != 0) {
            if let Some(size) = w.take() {
                queue(&mut conn, id, Op::TtyResize(size))?;
            }
        }
        if conn.queued() > 0 {
            conn.send_ready().map_err(io_err("sending to the agent"))?;
        }
    }
}

fn queue(conn: &mut FramedSocket<'_>, id: u64, op: Op) -> Result<()> {
    conn.queue(&Request { id, op }).map_err(ClientError::Frame)
}

/// After the last frame: input already queued still goes out whole (the agent
/// drops late session frames), so the connection stays at a frame boundary;
/// anything the agent sent after its last frame is a protocol fault.
fn finish(conn: &mut FramedSocket<'_>) -> Result<()> {
    conn.flush().map_err(io_err("sending to the agent"))?;
    if conn.buffered() > 0 {
        return Err(ClientError::Protocol(
            "data after the end of the terminal session".into(),
        ));
    }
    Ok(())
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
