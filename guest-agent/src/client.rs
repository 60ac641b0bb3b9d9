//! Host-side client: the hybrid-vsock handshake and typed calls, and
//! terminal sessions ([`AgentClient::exec_tty`], [`run_interactive`]).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::frame::{recv_message, send_message, FrameError};
use crate::proto::{
    ExecOutput, ExecRequest, ExitInfo, FreezeRequest, Op, OutputStream, PingInfo, ReadFileRequest,
    Request, Response, ResponseBody, WriteFileRequest, PROTOCOL_VERSION,
};

/// Per-call timeout used when none was given (connect, write, and reads of
/// calls that do not carry their own deadline).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest answer line accepted during the hybrid handshake.
const MAX_HANDSHAKE_LINE: usize = 64;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Unix socket could not be reached.
    #[error("connecting to {}: {source}", path.display())]
    Connect {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// The `CONNECT <port>` / `OK <n>` exchange failed.
    #[error("hybrid vsock handshake on {} (port {port}): {reason}", path.display())]
    Handshake {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// The guest port asked for.
        port: u32,
        /// What went wrong, including what was received.
        reason: String,
    },
    /// Setting socket options failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Underlying error.
        source: io::Error,
    },
    /// Sending or receiving a frame failed (includes timeouts).
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The agent closed the connection before answering.
    #[error("agent closed the connection before answering")]
    Closed,
    /// An earlier failure left the stream in an unknown state.
    #[error("connection unusable after an earlier failure; reconnect")]
    Poisoned,
    /// The agent answered with an error.
    #[error("agent error: {0}")]
    Agent(String),
    /// The agent is older than the request.
    #[error("the guest agent does not support {what}; update the agent in the guest image (it answered: {message})")]
    Unsupported {
        /// The feature asked for.
        what: &'static str,
        /// The agent's answer.
        message: String,
    },
    /// The agent answered something that does not fit the request.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {agent}, this client {client}")]
    VersionMismatch {
        /// The agent's version.
        agent: u32,
        /// Ours, [`PROTOCOL_VERSION`].
        client: u32,
    },
    /// [`wait_ready`] ran out of time.
    #[error("agent on {} port {port} not ready after {waited:?}; last error: {last}", path.display())]
    NotReady {
        /// The VMM's vsock Unix socket.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// Time spent trying.
        waited: Duration,
        /// The last attempt's failure.
        last: Box<ClientError>,
    },
}

/// Result alias for client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Performs the Firecracker-style hybrid vsock handshake on a fresh
/// connection: writes `CONNECT <port>\n`, expects `OK <n>\n`, and returns `n`.
/// Reads byte by byte so nothing after the line is consumed. On failure the
/// returned message says what was received.
pub fn hybrid_handshake<S: Read + Write>(
    stream: &mut S,
    port: u32,
) -> std::result::Result<u32, String> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {:?} (is the agent listening on port {port}?)",
                    String::from_utf8_lossy(&line)
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HANDSHAKE_LINE {
                    return Err(format!(
                        "answer line too long: {:?}...",
                        String::from_utf8_lossy(&line)
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "reading answer after {:?}: {e}",
                    String::from_utf8_lossy(&line)
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("OK ")
        .and_then(|n| n.trim_end_matches('\r').parse::<u32>().ok())
        .ok_or_else(|| format!("expected \"OK <port>\", got {text:?}"))
}

/// A connection to the guest agent. Calls are sequential; use one client per
/// thread (the agent serves each connection on its own thread).
pub struct AgentClient {
    stream: UnixStream,
    next_id: u64,
    timeout: Duration,
    poisoned: bool,
}

impl AgentClient {
    /// Connects to the VMM's vsock Unix socket and performs the hybrid
    /// handshake for guest `port`. `timeout` bounds the handshake and
    /// becomes the client's per-call timeout.
    pub fn connect_hybrid(
        uds_path: impl AsRef<Path>,
        port: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let path = uds_path.as_ref();
        let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let t = Some(nonzero(timeout));
        stream
            .set_read_timeout(t)
            .and_then(|()| stream.set_write_timeout(t))
            .map_err(|source| ClientError::Io {
                context: "setting socket timeouts",
                source,
            })?;
        hybrid_handshake(&mut stream, port).map_err(|reason| ClientError::Handshake {
            path: path.to_path_buf(),
            port,
            reason,
        })?;
        let mut client = Self::from_stream(stream);
        client.timeout = timeout;
        Ok(client)
    }

    /// Wraps a stream already connected to the agent (after any handshake).
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            stream,
            next_id: 1,
            timeout: DEFAULT_TIMEOUT,
            poisoned: false,
        }
    }

    /// Sets the per-call timeout (writes, and reads of calls without their
    /// own deadline; `exec` with `timeout_ms` waits that much longer).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Checks the agent is alive and speaks our protocol version.
    pub fn ping(&mut self) -> Result<PingInfo> {
        let op = Op::Ping {
            protocol_version: PROTOCOL_VERSION,
        };
        match self.call(op, Some(self.timeout))? {
            ResponseBody::Pong(p) if p.protocol_version == PROTOCOL_VERSION => Ok(p),
            ResponseBody::Pong(p) => Err(ClientError::VersionMismatch {
                agent: p.protocol_version,
                client: PROTOCOL_VERSION,
            }),
            other => Err(self.unexpected("pong", &other)),
        }
    }

    /// Runs a program and returns its collected output. A non-zero exit is
    /// reported in the result, not as an error.
    pub fn exec(&mut self, req: &ExecRequest) -> Result<ExecOutput> {
        let mut req = req.clone();
        req.stream = false;
        let read_timeout = self.exec_read_timeout(&req);
        match self.call(Op::Exec(req), read_timeout)? {
            ResponseBody::ExecResult(out) => Ok(out),
            other => Err(self.unexpected("exec_result", &other)),
        }
    }

    /// Runs a program, calling `on_output` for each chunk as the agent
    /// forwards it (in the order the agent read it), and returns how it ended.
    pub fn exec_streaming(
        &mut self,
        req: &ExecRequest,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<ExitInfo> {
        let mut req = req.clone();
        req.stream = true;
        let read_timeout = self.exec_read_timeout(&req);
        let id = self.send(Op::Exec(req))?;
        loop {
            match self.receive(id, read_timeout)? {
                ResponseBody::Output { stream, data } => on_output(stream, &data),
                ResponseBody::Exit(exit) => return Ok(exit),
                ResponseBody::Error { message } => return Err(ClientError::Agent(message)),
                other => return Err(self.unexpected("output or exit", &other)),
            }
        }
    }

    /// Flushes all guest filesystems (`sync(2)`).
    pub fn sync(&mut self) -> Result<()> {
        match self.call(Op::Sync, Some(self.timeout))? {
            ResponseBody::Synced => Ok(()),
            other => Err(self.unexpected("synced", &other)),
        }
    }

    /// Freezes `mountpoints` (default: every writable block-backed mount);
    /// the agent thaws by itself after `timeout`. Returns what was frozen.
    pub fn freeze(
        &mut self,
        mountpoints: Option<Vec<String>>,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let op = Op::Freeze(FreezeRequest {
            mountpoints,
            timeout_ms: Some(timeout_ms),
        });
        match self.call(op, Some(self.timeout))? {
            ResponseBody::Frozen { mountpoints } => Ok(mountpoints),
            other => Err(self.unexpected("frozen", &other)),
        }
    }

    /// Thaws what the agent froze. Returns what was thawed.
    pub fn thaw(&mut self) -> Result<Vec<String>> {
        match self.call(Op::Thaw, Some(self.timeout))? {
            ResponseBody::Thawed { mountpoints } => Ok(mountpoints),
            other => Err(self.unexpected("thawed", &other)),
        }
    }

    /// Reads a guest file (absolute path); fails if larger than `max_bytes`
    /// (default and cap [`crate::proto::MAX_READ_FILE`]).
    pub fn read_file(&mut self, path: &str, max_bytes: Option<u64>) -> Result<Vec<u8>> {
        let op = Op::ReadFile(ReadFileRequest {
            path: path.to_string(),
            max_bytes,
        });
        match self.call(op, Some(self.timeout))? {
            ResponseBody::FileData { data } => Ok(data),
            other => Err(self.unexpected("file_data", &other)),
        }
    }

    /// Atomically replaces a guest file (absolute path) with `data` and
    /// permission bits `mode`. Returns the bytes written.
    pub fn write_file(&mut self, path: &str, data: &[u8], mode: u32) -> Result<u64> {
        let op = Op::WriteFile(WriteFileRequest {
            path: path.to_string(),
            data: data.to_vec(),
            mode,
        });
        match self.call(op, Some(self.timeout))? {
            ResponseBody::FileWritten { bytes } => Ok(bytes),
            other => Err(self.unexpected("file_written", &other)),
        }
    }

    /// Reads wait for the command's own timeout plus the call timeout; with
    /// no command timeout they wait indefinitely.
    fn exec_read_timeout(&self, req: &ExecRequest) -> Option<Duration> {
        req.timeout_ms
            .map(|ms| self.timeout.saturating_add(Duration::from_millis(ms)))
    }

    fn call(&mut self, op: Op, read_timeout: Option<Duration>) -> Result<ResponseBody> {
        let id = self.send(op)?;
        match self.receive(id, read_timeout)? {
            ResponseBody::Error { message } => Err(ClientError::Agent(message)),
            body => Ok(body),
        }
    }

    fn send(&mut self, op: Op) -> Result<u64> {
        if self.poisoned {
            return Err(ClientError::Poisoned);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let timeout = Some(nonzero(self.timeout));
        if let Err(source) = self.stream.set_write_timeout(timeout) {
            return Err(ClientError::Io {
                context: "setting write timeout",
                source,
            });
        }
        send_message(&mut self.stream, &Request { id, op }).map_err(|e| {
            self.poisoned = true;
            ClientError::Frame(e)
        })?;
        Ok(id)
    }

    fn receive(&mut self, id: u64, read_timeout: Option<Duration>) -> Result<ResponseBody> {
        if let Err(source) = self.stream.set_read_timeout(read_timeout.map(nonzero)) {
            return Err(ClientError::Io {
                context: "setting read timeout",
                source,
            });
        }
        let resp: Response = match recv_message(&mut self.stream) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.poisoned = true;
                return Err(ClientError::Closed);
            }
            Err(e) => {
                self.poisoned = true;
                return Err(ClientError::Frame(e));
            }
        };
        match (resp.id, resp.body) {
            (Some(got), body) if got == id => Ok(body),
            // The agent could not parse our request far enough to find the id.
            (None, body @ ResponseBody::Error { .. }) => Ok(body),
            (got, _) => {
                self.poisoned = true;
                Err(ClientError::Protocol(format!(
                    "response id {got:?} does not match request id {id}"
                )))
            }
        }
    }

    fn unexpected(&mut self, wanted: &str, got: &ResponseBody) -> ClientError {
        self.poisoned = true;
        ClientError::Protocol(format!("expected {wanted}, got {}", body_kind(got)))
    }
}

fn body_kind(body: &ResponseBody) -> String {
    serde_json::to_value(body)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Socket timeouts of zero mean "block forever" to the kernel and are refused
/// by std; the shortest real timeout is used instead.
fn nonzero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// Connects and pings until the agent answers or `deadline` passes; used
/// after boot or restore. A protocol version mismatch fails at once.
pub fn wait_ready(
    uds_path: impl AsRef<Path>,
    port: u32,
    deadline: Instant,
) -> Result<(AgentClient, PingInfo)> {
    let path = uds_path.as_ref();
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = AgentClient::connect_hybrid(path, port, left.min(Duration::from_secs(2)))
            .and_then(|mut c| {
                let info = c.ping()?;
                c.set_timeout(DEFAULT_TIMEOUT);
                Ok((c, info))
            });
        let err = match attempt {
            Ok(ready) => return Ok(ready),
            Err(e @ ClientError::VersionMismatch { .. }) => return Err(e),
            Err(e) => e,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::NotReady {
                path: path.to_path_buf(),
                port,
                waited: start.elapsed(),
                last: Box::new(err),
            });
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

#[path = "client_tty.rs"]
mod tty;
pub use tty::{run_interactive, SessionEnd, TtyIo, DISCONNECT_EXIT_CODE};

#[cfg(test)]
#[path = "client_tests.rs"]
mod tests;
