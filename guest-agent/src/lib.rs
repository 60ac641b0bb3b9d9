//! The `vmm` guest agent: protocol, in-guest server, and host-side client.
//!
//! The agent (`vmm-agent`) runs inside the guest, listens on AF_VSOCK port
//! [`proto::DEFAULT_PORT`] (52) on any CID, and serves each connection on its
//! own thread. The host reaches it through the VMM's hybrid vsock Unix socket:
//! connect to the socket, write `CONNECT 52\n`, read `OK <n>\n`; from then on
//! the connection is a byte stream to the agent ([`client::hybrid_handshake`]).
//!
//! # Framing
//! Every message is one frame: a 4-byte big-endian body length followed by a
//! UTF-8 JSON body. Bodies larger than [`frame::MAX_FRAME_SIZE`] (32 MiB) are
//! refused before allocation; the agent answers an oversize header with an
//! `error` frame and closes that connection. Byte strings (stdin, output, file
//! data) are standard base64 with padding.
//!
//! # Requests
//! `{"id": <u64>, "op": "<name>", ...arguments}`. The client picks the id;
//! every response frame for that request carries it. Requests on one
//! connection are handled in order, one at a time. Unknown fields are ignored.
//!
//! | op | arguments | success response(s) |
//! |---|---|---|
//! | `ping` | `protocol_version` | `pong` |
//! | `exec` | `argv`, `env` (`["K=V"]`, added), `cwd`?, `stdin` (b64), `timeout_ms`?, `max_output_bytes`?, `stream` | `exec_result`, or if `stream`: `output`* then `exit` |
//! | `sync` | — | `synced` |
//! | `freeze` | `mountpoints`? (default: every writable `/dev/*` mount in `/proc/mounts`), `timeout_ms`? (default 30 s, max 10 min) | `frozen` |
//! | `thaw` | — | `thawed` |
//! | `read_file` | `path` (absolute), `max_bytes`? (default and cap 16 MiB) | `file_data` |
//! | `write_file` | `path` (absolute), `data` (b64), `mode` (default 0o644) | `file_written` |
//! | `exec_tty` | `argv`? (default: the login shell), `env`?, `cwd`?, `timeout_ms`?, `term`?, `size`? (`{rows, cols}`, default 24x80) | `output`* then `exit` |
//! | `tty_input` | `data` (b64) | none (part of a running `exec_tty`) |
//! | `tty_resize` | `rows`, `cols` | none (part of a running `exec_tty`) |
//! | `tty_eof` | — | none (part of a running `exec_tty`) |
//!
//! # Responses
//! `{"id": <u64 or null>, "type": "<name>", ...fields}`:
//! - `pong`: `protocol_version`, `agent_version`, `agent_uptime_ms`, `boot_uptime_ms`.
//! - `exec_result`: `exit_code` (null if killed), `signal` (null if exited),
//!   `timed_out`, `duration_ms`, `stdout`, `stderr` (b64), `stdout_truncated`,
//!   `stderr_truncated`. Each stream is collected up to `max_output_bytes`
//!   (default and cap 8 MiB); the rest is read and discarded.
//! - `output`: `stream` (`stdout`|`stderr`), `data` (b64, at most 64 KiB),
//!   in the order the agent read them.
//! - `exit`: `exit_code`, `signal`, `timed_out`, `duration_ms`.
//! - `synced`; `frozen`/`thawed`: `mountpoints`; `file_data`: `data`;
//!   `file_written`: `bytes`.
//! - `error`: `message`. Any request can fail this way; the connection stays
//!   usable. `id` is null when the request was not JSON or had no id.
//!
//! # Semantics
//! - `exec` runs the child in a new process group; on timeout the group gets
//!   SIGKILL and `timed_out` is set. After the child exits, output is read
//!   until end of file or for 250 ms at most (a daemon holding the pipes does
//!   not hang the request). Failing to start the program is an `error`.
//! - `freeze` uses FIFREEZE on each mountpoint and arms a watchdog that thaws
//!   at the deadline; a second freeze before a thaw is an error; `write_file`
//!   is refused while frozen. `thaw` thaws what the agent froze, or if nothing
//!   is recorded every block-backed mount (EINVAL, "not frozen", ignored). The
//!   agent also thaws everything at startup.
//! - `write_file` writes a temp file in the target's directory, fsyncs it,
//!   renames it over the target and fsyncs the directory.
//! - `exec_tty` runs the program on a new pseudo-terminal as the leader of a
//!   new session (so Ctrl-C, job control and full-screen programs work), with
//!   `TERM` from the request. Until its `exit` frame the connection belongs
//!   to the session: the host sends `tty_input` (raw bytes, control keys
//!   included), `tty_resize` and `tty_eof` (types the terminal's end-of-file
//!   character) frames with the session's `id`, without answers; `output`
//!   frames carry the terminal's single stream (as `stdout`). Other requests
//!   sent meanwhile get an `error`; session frames arriving after the end are
//!   ignored. While too much (output or such errors) waits for the host, the
//!   agent reads nothing more from it. On timeout every process of the
//!   session (background jobs included) gets SIGKILL and `timed_out` is set.
//!   If the host disconnects, the session is hung up (SIGHUP to its
//!   processes, SIGKILL to the leader's group after 1 s) and reaped; the
//!   client disconnects on `~.` typed at the start of a line and on SIGTERM,
//!   SIGHUP or SIGQUIT. Agents without `exec_tty` answer it with an
//!   unknown-variant `error` (and each session frame with another), which
//!   the client reports as unsupported.

pub mod client;
pub mod conn;
pub mod exec;
pub mod files;
pub mod frame;
pub mod freeze;
pub mod proto;
pub mod pty;
pub mod server;
pub mod sys;
pub mod terminal;
pub mod tty_session;
pub mod vsock;
