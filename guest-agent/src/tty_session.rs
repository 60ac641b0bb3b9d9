//! The agent's side of `exec_tty`: one program on a pseudo-terminal, relayed
//! to the host over the request's connection until the program exits.
//!
//! One thread polls the connection and the pty master. Output is read as it
//! comes and queued as `output` frames; the pty stops being read while too
//! much output waits for the host (the program then blocks on its terminal,
//! which is ordinary flow control). Input frames are written to the master
//! as the terminal accepts them, and the host stops being read while too much
//! input waits or too much (output, or answers refusing other requests) waits
//! to be sent to it, except to notice that it hung up; so neither queue grows
//! without bound whatever the host sends.
//!
//! When the host goes away mid-session the terminal is hung up the way a
//! modem line would be: the master is closed (the kernel sends SIGHUP to the
//! session leader), every process of the session gets SIGHUP and SIGCONT
//! (jobs that did not ask to survive it with `nohup` end), and after
//! [`HANGUP_GRACE`] the leader's process group gets SIGKILL; then the child
//! is reaped, so nothing is left waiting on a terminal nobody reads. A
//! timeout is harsher: every process of the session gets SIGKILL, background
//! jobs (in process groups of their own) and `nohup` ones included.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::conn::FramedSocket;
use crate::frame::FrameError;
use crate::proto::{
    ExecTtyRequest, ExitInfo, Op, OutputStream, Response, ResponseBody, WindowSize,
};
use crate::pty::{self, Pty};
use crate::server::parse_request;
use crate::sys;

/// How long output is still relayed after the program exited while another
/// process keeps the terminal open.
pub const EXIT_GRACE: Duration = Duration::from_millis(250);

/// How long a hung-up session gets to exit before SIGKILL.
pub const HANGUP_GRACE: Duration = Duration::from_secs(1);

/// Longest sleep of the loop; bounds how late an exit or a timeout is seen.
const MAX_TICK: Duration = Duration::from_millis(50);

/// Read size on the master (also the largest `output` chunk).
const CHUNK: usize = 16 * 1024;

/// Input waiting for the terminal beyond which the host is not read.
const INPUT_BACKLOG: usize = 64 * 1024;

/// Bytes waiting to be sent to the host beyond which neither the pty nor
/// the host is read (answers to refused requests count too).
const OUTPUT_BACKLOG: usize = 256 * 1024;

/// Rounds of SIGKILL to a session's processes on timeout (a process may fork
/// between one look at `/proc` and its SIGKILL).
const KILL_ROUNDS: usize = 50;

/// Pause between those rounds.
const KILL_PAUSE: Duration = Duration::from_millis(5);

/// Why a session ended without an `exit`.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The host closed the connection (cleanly if `None`) or it broke.
    #[error("host connection lost{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    HostGone(Option<io::Error>),
    /// The host sent something that cannot be framed; the stream is lost.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The terminal itself failed.
    #[error("terminal session of {program:?} failed while {context}: {source}")]
    Pty {
        program: String,
        context: &'static str,
        source: io::Error,
    },
}

/// Serves one `exec_tty` request on connection `fd`: `output` frames, then
/// `exit` (or one `error` if the program could not start or the terminal
/// failed). `Ok` means the connection can serve further requests (or was
/// closed cleanly by the host); `Err` means it is broken.
pub fn serve(id: u64, req: &ExecTtyRequest, fd: BorrowedFd<'_>) -> Result<(), FrameError> {
    let mut conn = FramedSocket::new(fd);
    let started = Pty::open(req.size.unwrap_or_default())
        .and_then(|pty| pty::spawn(req, &pty).map(|(child, program)| (pty, child, program)));
    let (pty, child, program) = match started {
        Ok(s) => s,
        Err(e) => {
            return finish(
                &mut conn,
                id,
                ResponseBody::Error {
                    message: e.to_string(),
                },
            )
        }
    };
    let Pty { master, slave, .. } = pty;
    // The child has its own copies; ours would keep the terminal from ever
    // reporting that the program's side is closed.
    drop(slave);
    let mut session = Session {
        id,
        pid: child.id() as libc::pid_t,
        child,
        program,
        eof_char: pty::eof_char(master.as_fd()),
        master: Some(master),
        master_open: true,
        input: Vec::new(),
        conn,
    };
    match session.run(req.timeout_ms) {
        Ok(exit) => finish(&mut session.conn, id, ResponseBody::Exit(exit)),
        Err(SessionError::HostGone(None)) => {
            eprintln!(
                "vmm-agent: host closed the connection during the terminal session of {:?}; \
                 hung it up",
                session.program
            );
            Ok(())
        }
        Err(SessionError::HostGone(Some(e))) => Err(FrameError::Io(e)),
        Err(SessionError::Frame(e)) => {
            // Best effort, without waiting: the stream cannot be resynchronized.
            let body = ResponseBody::Error {
                message: e.to_string(),
            };
            if session.conn.queue(&Response { id: Some(id), body }).is_ok() {
                let _ = session.conn.send_ready();
            }
            Err(e)
        }
        Err(e @ SessionError::Pty { .. }) => {
            let message = e.to_string();
            finish(&mut session.conn, id, ResponseBody::Error { message })
        }
    }
}

/// Sends the last frame of the session, then reads the rest of any frame the
/// host was in the middle of sending so the next request starts on a frame
/// boundary. Frames still buffered were sent while the session ran and get
/// the same treatment as during it. A frame too large to accept ends the
/// connection, after an `error` saying so (as between requests).
fn finish(conn: &mut FramedSocket<'_>, id: u64, body: ResponseBody) -> Result<(), FrameError> {
    conn.queue(&Response { id: Some(id), body })?;
    conn.flush()?;
    let rest = absorb_frames(conn, id, usize::MAX, |_| {})
        .and_then(|()| conn.finish_partial_frame())
        .and_then(|open| match open {
            true => absorb_frames(conn, id, usize::MAX, |_| {}),
            false => Ok(()),
        });
    match rest {
        Ok(()) => Ok(conn.flush()?),
        Err(e @ FrameError::TooLarge { .. }) => {
            // Best effort, without waiting: the connection is closed anyway.
            let body = ResponseBody::Error {
                message: e.to_string(),
            };
            if conn.queue(&Response { id: None, body }).is_ok() {
                let _ = conn.send_ready();
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// Takes the complete frames buffered on `conn` while fewer than
/// `max_queued` bytes wait to be sent (the rest stay buffered for later):
/// session frames of request `id` go to `apply`; those of another id (late
/// ones of an earlier session) are ignored; any other request is refused
/// with an `error`, since the connection belongs to the session until its
/// `exit` frame.
fn absorb_frames(
    conn: &mut FramedSocket<'_>,
    id: u64,
    max_queued: usize,
    mut apply: impl FnMut(Op),
) -> Result<(), FrameError> {
    while conn.queued() < max_queued {
        let Some(body) = conn.next_frame()? else {
            break;
        };
        let (req_id, message) = match parse_request(&body) {
            Ok(req) if req.op.is_tty_session_frame() => {
                if req.id == id {
                    apply(req.op);
                }
                continue;
            }
            Ok(req) => (
                Some(req.id),
                format!(
                    "request {} refused: a terminal session (request {id}) is running on this \
                     connection",
                    req.id
                ),
            ),
            Err(bad) => bad,
        };
        conn.queue(&Response {
            id: req_id,
            body: ResponseBody::Error { message },
        })?;
    }
    Ok(())
}

/// A running terminal program and its relay.
struct Session<'a> {
    id: u64,
    child: Child,
    /// The child's pid, also its process-group and session id.
    pid: libc::pid_t,
    program: String,
    eof_char: u8,
    /// Closed early when hanging up.
    master: Option<OwnedFd>,
    /// False once the master reported that no process has the slave open.
    master_open: bool,
    /// Host input not yet accepted by the terminal.
    input: Vec<u8>,
    conn: FramedSocket<'a>,
}

impl Session<'_> {
    fn pty_err(&self, context: &'static str) -> impl FnOnce(io::Error) -> SessionError {
        let program = self.program.clone();
        move |source| SessionError::Pty {
            program,
            context,
            source,
        }
    }

    /// Relays until the program has exited and its output is drained, then
    /// reaps it. On failure the session is hung up and the child reaped.
    fn run(&mut self, timeout_ms: Option<u64>) -> Result<ExitInfo, SessionError> {
        let start = Instant::now();
        let deadline = timeout_ms.and_then(|ms| start.checked_add(Duration::from_millis(ms)));
        match self.relay(deadline) {
            Ok(timed_out) => {
                let status = self
                    .child
                    .wait()
                    .map_err(self.pty_err("reaping the program"))?;
                Ok(ExitInfo {
                    exit_code: status.code(),
                    signal: status.signal(),
                    timed_out,
                    duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
                })
            }
            Err(e) => {
                self.hang_up();
                Err(e)
            }
        }
    }

    /// The poll loop; returns whether the timeout killed the program.
    fn relay(&mut self, deadline: Option<Instant>) -> Result<bool, SessionError> {
        let mut exited_at: Option<Instant> = None;
        let mut timed_out = false;
        loop {
            let now = Instant::now();
            if exited_at.is_none() && pty::has_exited(self.pid).map_err(self.pty_err("waiting"))? {
                exited_at = Some(now);
            }
            if let Some(at) = exited_at {
                if !self.master_open || now.duration_since(at) >= EXIT_GRACE {
                    return Ok(timed_out);
                }
            }
            if let (Some(d), None, false) = (deadline, exited_at, timed_out) {
                if now >= d {
                    self.kill_session();
                    timed_out = true;
                }
            }
            let mut wait = match exited_at {
                Some(at) => EXIT_GRACE.saturating_sub(now.duration_since(at)),
                None => MAX_TICK,
            };
            if let (Some(d), false) = (deadline, timed_out) {
                wait = wait.min(d.saturating_duration_since(now));
            }
            self.step(wait)?;
        }
    }

    /// One poll and the I/O it allows.
    fn step(&mut self, wait: Duration) -> Result<(), SessionError> {
        // Refused requests queue answers: with the queue full, the host is
        // not read until it takes what waits for it.
        let read_host = self.input.len() < INPUT_BACKLOG && self.conn.queued() < OUTPUT_BACKLOG;
        let mut conn_events = if read_host {
            libc::POLLIN
        } else {
            // Only to notice a hang-up while the terminal is not taking input.
            libc::POLLRDHUP
        };
        if self.conn.queued() > 0 {
            conn_events |= libc::POLLOUT;
        }
        let mut master_events = 0;
        if self.master_open {
            if self.conn.queued() < OUTPUT_BACKLOG {
                master_events |= libc::POLLIN;
            }
            if !self.input.is_empty() {
                master_events |= libc::POLLOUT;
            }
        }
        let master = self.master.as_ref().map(|m| m.as_fd());
        let mut fds = [
            sys::pollfd(Some(self.conn.fd()), conn_events),
            sys::pollfd(master, master_events),
        ];
        sys::poll(&mut fds, Some(wait)).map_err(self.pty_err("polling"))?;
        let (conn_ready, master_ready) = (fds[0].revents, fds[1].revents);

        let hangup = libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP | libc::POLLNVAL;
        if read_host && conn_ready & (libc::POLLIN | hangup) != 0 {
            match self.conn.receive() {
                Ok(true) => {}
                Ok(false) => return Err(SessionError::HostGone(None)),
                Err(e) => return Err(SessionError::HostGone(Some(e))),
            }
        } else if !read_host && conn_ready & hangup != 0 {
            return Err(SessionError::HostGone(None));
        }
        // Also frames left from an earlier receive while the queue was full.
        self.take_frames()?;
        if master_ready & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            self.read_output()?;
        }
        if master_ready & libc::POLLOUT != 0 {
            self.write_input()?;
        }
        if self.conn.queued() > 0 {
            self.conn
                .send_ready()
                .map_err(|e| SessionError::HostGone(Some(e)))?;
        }
        Ok(())
    }

    /// Applies the session frames received so far, as far as the outgoing
    /// queue has room for answers to other requests.
    fn take_frames(&mut self) -> Result<(), SessionError> {
        let mut ops = Vec::new();
        absorb_frames(&mut self.conn, self.id, OUTPUT_BACKLOG, |op| ops.push(op))?;
        for op in ops {
            match op {
                Op::TtyInput { data } => self.input.extend_from_slice(&data),
                Op::TtyEof => self.input.push(self.eof_char),
                Op::TtyResize(size) => self.resize(size),
                _ => {}
            }
        }
        Ok(())
    }

    /// A failed resize is logged, not fatal: the program keeps running in
    /// the old size.
    fn resize(&self, size: WindowSize) {
        let Some(master) = &self.master else { return };
        if let Err(e) = sys::set_window_size(master.as_fd(), size) {
            eprintln!(
                "vmm-agent: resizing the terminal of {:?} to {}x{}: {e}",
                self.program, size.cols, size.rows
            );
        }
    }

    /// Queues what the terminal has for the host, up to the backlog limit.
    fn read_output(&mut self) -> Result<(), SessionError> {
        let Some(master) = self.master.as_ref().map(|m| m.as_fd()) else {
            return Ok(());
        };
        let mut buf = [0u8; CHUNK];
        while self.conn.queued() < OUTPUT_BACKLOG {
            match sys::read(master, &mut buf) {
                Ok(0) => {
                    self.master_open = false;
                    break;
                }
                Ok(n) => self.conn.queue(&Response {
                    id: Some(self.id),
                    body: ResponseBody::Output {
                        stream: OutputStream::Stdout,
                        data: buf[..n].to_vec(),
                    },
                })?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Linux reports a pty whose slave is closed everywhere as EIO.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    self.master_open = false;
                    break;
                }
                Err(e) => return Err(self.pty_err("reading the terminal")(e)),
            }
        }
        Ok(())
    }

    /// Writes pending input as far as the terminal takes it.
    fn write_input(&mut self) -> Result<(), SessionError> {
        let Some(master) = self.master.as_ref().map(|m| m.as_fd()) else {
            return Ok(());
        };
        while !self.input.is_empty() {
            match sys::write(master, &self.input) {
                Ok(0) => break,
                Ok(n) => {
                    self.input.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Nobody has the terminal open any more: the input has no reader.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    self.input.clear();
                    self.master_open = false;
                }
                Err(e) => return Err(self.pty_err("writing to the terminal")(e)),
            }
        }
        Ok(())
    }

    /// Sends `sig` to every process of the session, background jobs (in
    /// process groups of their own) included, and to the leader's group.
    /// The leader is unreaped, so the session and group ids it gives its
    /// name to cannot belong to anybody else.
    fn signal_session(&self, sig: libc::c_int) -> usize {
        let members = pty::session_members(self.pid);
        for &pid in &members {
            pty::signal_process(pid, sig);
        }
        pty::signal_group(self.pid, sig);
        members.len()
    }

    /// On timeout: SIGKILL to the whole session, again until no process of
    /// it runs any more (one may fork between the look at `/proc` and its
    /// SIGKILL), for at most [`KILL_ROUNDS`] rounds.
    fn kill_session(&self) {
        for _ in 0..KILL_ROUNDS {
            if self.signal_session(libc::SIGKILL) == 0 {
                return;
            }
            std::thread::sleep(KILL_PAUSE);
        }
        eprintln!(
            "vmm-agent: processes of the timed-out session of {:?} (session {}) survived SIGKILL",
            self.program, self.pid
        );
    }

    /// Hangs the terminal up and makes sure the program is gone and reaped.
    fn hang_up(&mut self) {
        // Closing the master hangs up the slave: SIGHUP to the session leader.
        self.master = None;
        // Every process of the session gets the hang-up, background jobs
        // (in groups of their own) included; `nohup` ones survive it.
        self.signal_session(libc::SIGHUP);
        self.signal_session(libc::SIGCONT);
        let until = Instant::now() + HANGUP_GRACE;
        while Instant::now() < until && !pty::has_exited(self.pid).unwrap_or(true) {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The leader is unreaped (has_exited does not reap), so its group id
        // still names this group: whatever is left of it goes now.
        pty::signal_group(self.pid, libc::SIGKILL);
        if let Err(e) = self.child.wait() {
            eprintln!(
                "vmm-agent: reaping {:?} (pid {}): {e}",
                self.program, self.pid
            );
        }
    }
}

#[cfg(test)]
#[path = "tty_session_tests.rs"]
mod tests;
