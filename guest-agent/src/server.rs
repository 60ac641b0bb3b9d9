//! The agent's request loop, generic over any byte stream so it runs over
//! vsock in the guest and over Unix socket pairs in tests.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::Instant;

use crate::exec;
use crate::files;
use crate::frame::{read_frame, write_frame, FrameError, MAX_FRAME_SIZE};
use crate::freeze::FreezeController;
use crate::proto::{
    ExecRequest, Op, PingInfo, Request, Response, ResponseBody, AGENT_VERSION, PROTOCOL_VERSION,
};
use crate::tty_session;

/// State shared by all connections of one agent process.
pub struct Agent {
    started: Instant,
    freeze: FreezeController,
}

impl Agent {
    /// An agent whose freeze/thaw acts through `freeze`.
    pub fn new(freeze: FreezeController) -> Self {
        Self {
            started: Instant::now(),
            freeze,
        }
    }

    /// An agent acting on the real system.
    pub fn system() -> Self {
        Self::new(FreezeController::system())
    }

    /// The freeze controller (the binary thaws everything through it at startup).
    pub fn freeze_controller(&self) -> &FreezeController {
        &self.freeze
    }

    fn ping(&self) -> PingInfo {
        PingInfo {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_string(),
            agent_uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            boot_uptime_ms: boot_uptime_ms(),
        }
    }
}

/// Milliseconds since boot, including suspended time; 0 if unavailable.
fn boot_uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1000).saturating_add(nanos / 1_000_000)
}

/// Why a connection ended other than by a clean end of stream.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The stream broke or carried an unrecoverable frame (oversize or
    /// truncated); an error frame was sent first where possible.
    #[error("connection ended: {0}")]
    Frame(#[from] FrameError),
}

/// Serves requests on one connection until the peer closes it.
///
/// Requests are handled one at a time in arrival order. A malformed request
/// gets an `error` response and the connection stays open; an oversize frame
/// gets an `error` response and closes the connection (the stream cannot be
/// resynchronized without reading the whole announced body).
///
/// An `exec_tty` request turns the connection into that terminal's relay
/// until its `exit` frame (see [`tty_session`]); the stream must therefore be
/// a socket the agent can poll.
pub fn serve_connection<S: Read + Write + AsFd>(
    agent: &Agent,
    mut stream: S,
) -> Result<(), ServeError> {
    loop {
        let body = match read_frame(&mut stream) {
            Ok(Some(body)) => body,
            Ok(None) => return Ok(()),
            Err(e @ FrameError::TooLarge { .. }) => {
                // Best effort: the peer may not be reading any more.
                let _ = send(&mut stream, None, error_body(e.to_string()));
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        match parse_request(&body) {
            Ok(req) => handle(agent, req, &mut stream)?,
            Err((id, message)) => send(&mut stream, id, error_body(message))?,
        }
    }
}

/// Parses a request; on failure returns the id if one could be found, so the
/// error response can still be matched.
pub(crate) fn parse_request(body: &[u8]) -> Result<Request, (Option<u64>, String)> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| (None, format!("request is not valid JSON: {e}")))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    serde_json::from_value(value).map_err(|e| (id, format!("invalid request: {e}")))
}

fn error_body(message: String) -> ResponseBody {
    ResponseBody::Error { message }
}

/// Sends one response; a response too large for a frame becomes an error.
fn send<W: Write>(w: &mut W, id: Option<u64>, body: ResponseBody) -> Result<(), FrameError> {
    let bytes = serde_json::to_vec(&Response { id, body })?;
    if bytes.len() > MAX_FRAME_SIZE {
        let message = format!(
            "response of {} bytes exceeds the maximum frame size of {MAX_FRAME_SIZE} bytes",
            bytes.len()
        );
        let bytes = serde_json::to_vec(&Response {
            id,
            body: error_body(message),
        })?;
        return write_frame(w, &bytes);
    }
    write_frame(w, &bytes)
}

fn handle<S: Read + Write + AsFd>(
    agent: &Agent,
    req: Request,
    stream: &mut S,
) -> Result<(), FrameError> {
    let id = Some(req.id);
    let body = match req.op {
        Op::Ping { .. } => ResponseBody::Pong(agent.ping()),
        Op::ExecTty(tty) => return tty_session::serve(req.id, &tty, stream.as_fd()),
        // Late input of a session that has ended: nobody waits for an answer.
        Op::TtyInput { .. } | Op::TtyResize(_) | Op::TtyEof => return Ok(()),
        Op::Exec(exec) if exec.stream => return exec_streaming(req.id, &exec, stream),
        Op::Exec(exec) => match exec::run_collect(&exec) {
            Ok(out) => ResponseBody::ExecResult(out),
            Err(e) => error_body(e.to_string()),
        },
        Op::Sync => {
            // SAFETY: sync(2) takes no arguments and cannot fail.
            unsafe { libc::sync() };
            ResponseBody::Synced
        }
        Op::Freeze(f) => match agent.freeze.freeze(&f) {
            Ok(mountpoints) => ResponseBody::Frozen { mountpoints },
            Err(e) => error_body(e.to_string()),
        },
        Op::Thaw => match agent.freeze.thaw() {
            Ok(mountpoints) => ResponseBody::Thawed { mountpoints },
            Err(e) => error_body(e.to_string()),
        },
        Op::ReadFile(r) => match files::read_file(&r.path, r.max_bytes) {
            Ok(data) => ResponseBody::FileData { data },
            Err(e) => error_body(e.to_string()),
        },
        Op::WriteFile(w) => {
            if agent.freeze.is_frozen() {
                error_body(format!(
                    "{}: filesystems are frozen; thaw before writing",
                    w.path
                ))
            } else {
                match files::write_file(&w.path, &w.data, w.mode) {
                    Ok(bytes) => ResponseBody::FileWritten { bytes },
                    Err(e) => error_body(e.to_string()),
                }
            }
        }
    };
    send(stream, id, body)
}

/// Streams `output` frames as the child writes, then one `exit` frame (or an
/// `error` frame if the program could not run).
fn exec_streaming<S: Write>(id: u64, req: &ExecRequest, stream: &mut S) -> Result<(), FrameError> {
    let mut send_failure: Option<FrameError> = None;
    let result = exec::run(req, &mut |which, data| {
        let body = ResponseBody::Output {
            stream: which,
            data: data.to_vec(),
        };
        send(stream, Some(id), body).map_err(|e| {
            let err = io::Error::other(e.to_string());
            send_failure = Some(e);
            err
        })
    });
    if let Some(e) = send_failure {
        return Err(e);
    }
    match result {
        Ok(exit) => send(stream, Some(id), ResponseBody::Exit(exit)),
        Err(e) => send(stream, Some(id), error_body(e.to_string())),
    }
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
