//! Wire messages. See the crate documentation for the protocol description.

use serde::{Deserialize, Serialize};

/// Protocol version reported by `ping`. Bump on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Version of this crate, reported by the agent in `pong`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 52;

/// Upper bound on collected (non-streaming) exec output, per stream. Two full
/// streams, base64-encoded, still fit in one frame.
pub const MAX_COLLECT_OUTPUT: u64 = 8 * 1024 * 1024;

/// Upper bound on `read_file` size; base64-encoded it fits in one frame.
pub const MAX_READ_FILE: u64 = 16 * 1024 * 1024;

/// Default freeze watchdog timeout.
pub const DEFAULT_FREEZE_TIMEOUT_MS: u64 = 30_000;

/// Longest freeze the agent accepts before refusing the request.
pub const MAX_FREEZE_TIMEOUT_MS: u64 = 10 * 60 * 1000;

/// Byte vectors travel as standard base64 strings.
pub(crate) mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }
}

/// One request frame: an id chosen by the client plus the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in every response frame belonging to this request.
    pub id: u64,
    /// The operation and its arguments.
    #[serde(flatten)]
    pub op: Op,
}

/// Operations, tagged by the `op` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Liveness and version check.
    Ping {
        /// The client's [`PROTOCOL_VERSION`].
        #[serde(default)]
        protocol_version: u32,
    },
    /// Run a program.
    Exec(ExecRequest),
    /// `sync()` all filesystems.
    Sync,
    /// Freeze filesystems (FIFREEZE) with a thaw watchdog.
    Freeze(FreezeRequest),
    /// Thaw what was frozen (or, if nothing is recorded, every block-backed fs).
    Thaw,
    /// Read a whole file.
    ReadFile(ReadFileRequest),
    /// Atomically replace a file.
    WriteFile(WriteFileRequest),
    /// Run a program on a new pseudo-terminal and relay it both ways; the
    /// `tty_*` frames below then carry the terminal's input (same `id`)
    /// until the `exit` frame.
    ExecTty(ExecTtyRequest),
    /// Bytes typed at the terminal of the session started by `exec_tty`.
    TtyInput {
        /// Raw bytes, control characters included (Ctrl-C is 0x03).
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// The host's terminal changed size.
    TtyResize(WindowSize),
    /// The host's input ended: the agent types the terminal's end-of-file
    /// character (Ctrl-D), which a shell reading a line takes as `exit`.
    TtyEof,
}

impl Op {
    /// True for the frames that belong to a running `exec_tty` session; they
    /// get no response of their own.
    pub fn is_tty_session_frame(&self) -> bool {
        matches!(self, Op::TtyInput { .. } | Op::TtyResize(_) | Op::TtyEof)
    }
}

/// Arguments of `exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (or overriding) the agent's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory; the agent's own if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Bytes written to the child's stdin, which is then closed.
    #[serde(default, with = "b64")]
    pub stdin: Vec<u8>,
    /// Kill the whole process group after this long; no limit if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Per-stream cap on collected output (clamped to [`MAX_COLLECT_OUTPUT`]).
    /// Ignored when streaming.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
    /// Send `output` frames as data arrives, then an `exit` frame, instead of
    /// one `exec_result` frame.
    #[serde(default)]
    pub stream: bool,
}

impl ExecRequest {
    /// A request running `argv` with no stdin, no timeout, default limits.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: Vec::new(),
            timeout_ms: None,
            max_output_bytes: None,
            stream: false,
        }
    }
}

/// Terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    /// Lines.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

impl Default for WindowSize {
    /// The classic 80x24, for when the host has no terminal to measure.
    fn default() -> Self {
        Self { rows: 24, cols: 80 }
    }
}

/// Arguments of `exec_tty`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecTtyRequest {
    /// Program and arguments (`argv[0]` looked up in `PATH`); empty runs the
    /// login shell of the agent's user (`/etc/passwd`, else `$SHELL`, else
    /// `/bin/sh`) as a login shell, in its home directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries added to (or overriding) the environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory (default: the login shell's home, or the agent's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Kill the terminal's process group after this long; no limit if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `TERM` for the program (default [`DEFAULT_TERM`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// Initial window size (default 80x24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<WindowSize>,
}

/// `TERM` when the host sends none: understood by nearly every emulator.
pub const DEFAULT_TERM: &str = "xterm";

/// Arguments of `freeze`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRequest {
    /// Mountpoints to freeze; by default every writable block-backed mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mountpoints: Option<Vec<String>>,
    /// The agent thaws by itself after this long
    /// (default [`DEFAULT_FREEZE_TIMEOUT_MS`], at most [`MAX_FREEZE_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Arguments of `read_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadFileRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Fail if the file is larger (default and cap [`MAX_READ_FILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
}

/// Arguments of `write_file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFileRequest {
    /// Absolute path in the guest; its directory must exist.
    pub path: String,
    /// New contents.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
    /// Permission bits of the new file (default 0o644).
    #[serde(default = "default_file_mode")]
    pub mode: u32,
}

fn default_file_mode() -> u32 {
    0o644
}

/// One response frame: the request id (absent when the request could not be
/// parsed far enough to find it) and the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Id of the request this answers.
    pub id: Option<u64>,
    /// The answer, tagged by the `type` field.
    #[serde(flatten)]
    pub body: ResponseBody,
}

/// Response bodies, tagged by the `type` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseBody {
    /// Answer to `ping`.
    Pong(PingInfo),
    /// Answer to a collecting `exec`.
    ExecResult(ExecOutput),
    /// A chunk of output of a streaming `exec`.
    Output {
        /// Which stream the chunk came from.
        stream: OutputStream,
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Last frame of a streaming `exec`.
    Exit(ExitInfo),
    /// Answer to `sync`.
    Synced,
    /// Answer to `freeze`: what is now frozen.
    Frozen {
        /// Mountpoints frozen, in freeze order.
        mountpoints: Vec<String>,
    },
    /// Answer to `thaw`: what was thawed.
    Thawed {
        /// Mountpoints thawed.
        mountpoints: Vec<String>,
    },
    /// Answer to `read_file`.
    FileData {
        /// The file contents.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Answer to `write_file`.
    FileWritten {
        /// Bytes written.
        bytes: u64,
    },
    /// The request failed; the connection stays usable.
    Error {
        /// Human-readable cause, with context.
        message: String,
    },
}

/// Agent identity and uptime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    /// The agent's [`PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// Milliseconds since the agent process started (monotonic clock).
    pub agent_uptime_ms: u64,
    /// Milliseconds since guest boot (CLOCK_BOOTTIME).
    pub boot_uptime_ms: u64,
}

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// The child's standard output.
    Stdout,
    /// The child's standard error.
    Stderr,
}

/// How a process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Exit code if the process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number if the process was killed by a signal.
    pub signal: Option<i32>,
    /// The timeout fired and the process group was killed.
    pub timed_out: bool,
    /// Wall time from spawn to reap.
    pub duration_ms: u64,
}

impl ExitInfo {
    /// True if the process exited with code 0 and did not time out.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

/// Result of a collecting `exec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    /// How the process ended.
    #[serde(flatten)]
    pub exit: ExitInfo,
    /// Collected standard output.
    #[serde(with = "b64")]
    pub stdout: Vec<u8>,
    /// Collected standard error.
    #[serde(with = "b64")]
    pub stderr: Vec<u8>,
    /// Standard output exceeded the limit; the rest was discarded.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Standard error exceeded the limit; the rest was discarded.
    #[serde(default)]
    pub stderr_truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_wire_shape() {
        let req = Request {
            id: 7,
            op: Op::Exec(ExecRequest {
                stdin: b"hi".to_vec(),
                timeout_ms: Some(100),
                ..ExecRequest::new(["echo", "x"])
            }),
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({"id":7,"op":"exec","argv":["echo","x"],"env":[],"stdin":"aGk=",
                   "timeout_ms":100,"stream":false})
        );
        let back: Request = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);

        let ping: Request = serde_json::from_str(r#"{"id":1,"op":"ping"}"#).unwrap();
        assert_eq!(
            ping.op,
            Op::Ping {
                protocol_version: 0
            }
        );
        let sync: Request = serde_json::from_str(r#"{"id":2,"op":"sync"}"#).unwrap();
        assert_eq!(sync.op, Op::Sync);
        let w: Request =
            serde_json::from_str(r#"{"id":3,"op":"write_file","path":"/a","data":""}"#).unwrap();
        assert_eq!(
            w.op,
            Op::WriteFile(WriteFileRequest {
                path: "/a".into(),
                data: vec![],
                mode: 0o644
            })
        );
    }

    #[test]
    fn response_wire_shape() {
        let resp = Response {
            id: Some(9),
            body: ResponseBody::ExecResult(ExecOutput {
                exit: ExitInfo {
                    exit_code: Some(3),
                    signal: None,
                    timed_out: false,
                    duration_ms: 5,
                },
                stdout: b"out".to_vec(),
                stderr: vec![],
                stdout_truncated: false,
                stderr_truncated: false,
            }),
        };
        let v = serde_json::to_value(&resp).unwrap();
        assert_eq!(v["type"], "exec_result");
        assert_eq!(v["exit_code"], 3);
        assert_eq!(v["stdout"], "b3V0");
        let back: Response = serde_json::from_value(v).unwrap();
        assert_eq!(back, resp);

        let err: Response =
            serde_json::from_str(r#"{"id":null,"type":"error","message":"bad"}"#).unwrap();
        assert_eq!(err.id, None);
        assert_eq!(
            err.body,
            ResponseBody::Error {
                message: "bad".into()
            }
        );
    }

    #[test]
    fn bad_base64_and_unknown_op_rejected() {
        assert!(serde_json::from_str::<Request>(
            r#"{"id":1,"op":"write_file","path":"/a","data":"%%%"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Request>(r#"{"id":1,"op":"reboot"}"#).is_err());
    }

    #[test]
    fn tty_messages_wire_shape() {
        let req = Request {
            id: 4,
            op: Op::ExecTty(ExecTtyRequest {
                argv: vec!["top".into()],
                term: Some("xterm-256color".into()),
                size: Some(WindowSize {
                    rows: 50,
                    cols: 132,
                }),
                timeout_ms: Some(1000),
                ..ExecTtyRequest::default()
            }),
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(
            v,
            json!({"id":4,"op":"exec_tty","argv":["top"],"timeout_ms":1000,
                   "term":"xterm-256color","size":{"rows":50,"cols":132}})
        );
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), req);

        // Everything is optional: a bare exec_tty asks for the login shell.
        let bare: Request = serde_json::from_str(r#"{"id":1,"op":"exec_tty"}"#).unwrap();
        assert_eq!(bare.op, Op::ExecTty(ExecTtyRequest::default()));

        let session = [
            (
                Op::TtyInput {
                    data: b"ls\x03".to_vec(),
                },
                json!({"id":4,"op":"tty_input","data":"bHMD"}),
            ),
            (
                Op::TtyResize(WindowSize { rows: 3, cols: 9 }),
                json!({"id":4,"op":"tty_resize","rows":3,"cols":9}),
            ),
            (Op::TtyEof, json!({"id":4,"op":"tty_eof"})),
        ];
        for (op, wire) in session {
            assert!(op.is_tty_session_frame());
            let req = Request { id: 4, op };
            assert_eq!(serde_json::to_value(&req).unwrap(), wire);
            assert_eq!(serde_json::from_value::<Request>(wire).unwrap(), req);
        }
        assert!(!Op::Sync.is_tty_session_frame());
        assert!(serde_json::from_str::<Request>(
            r#"{"id":1,"op":"tty_resize","rows":-1,"cols":2}"#
        )
        .is_err());
    }

    #[test]
    fn old_exec_requests_still_decode() {
        // An exec request as the first protocol version's clients send it.
        let old: Request = serde_json::from_str(
            r#"{"id":3,"op":"exec","argv":["sh","-c","true"],"env":[],"stdin":"","stream":true}"#,
        )
        .unwrap();
        let mut want = ExecRequest::new(["sh", "-c", "true"]);
        want.stream = true;
        assert_eq!(old.op, Op::Exec(want));
        // And the minimal form, with unknown fields from newer clients ignored.
        let min: Request =
            serde_json::from_str(r#"{"id":3,"op":"exec","argv":["true"],"tty":true}"#).unwrap();
        assert_eq!(min.op, Op::Exec(ExecRequest::new(["true"])));
    }
}
