//! Talking to a sandbox's guest agent (through its vsock Unix socket): wait
//! for it, sync and freeze filesystems, set the clock, run commands.

use std::io::Write;
use std::time::{Duration, Instant};

use guest_agent::client::{self, AgentClient};
use guest_agent::proto::{ExecRequest, ExitInfo, OutputStream, DEFAULT_PORT};

use super::clock;
use super::error::{Error, Result};
use super::sandbox::Sandbox;

fn agent_err(sb: &Sandbox, e: impl std::fmt::Display) -> Error {
    Error::Agent {
        sandbox: sb.meta.name.clone(),
        message: e.to_string(),
    }
}

/// Pings until the agent answers or `deadline` passes.
pub fn wait_ready(sb: &Sandbox, deadline: Instant) -> Result<()> {
    client::wait_ready(&sb.paths.vsock, DEFAULT_PORT, deadline)
        .map(|_| ())
        .map_err(|e| agent_err(sb, e))
}

/// A connection, trying for at most `timeout`.
pub fn connect(sb: &Sandbox, timeout: Duration) -> Result<AgentClient> {
    client::wait_ready(&sb.paths.vsock, DEFAULT_PORT, Instant::now() + timeout)
        .map(|(c, _)| c)
        .map_err(|e| agent_err(sb, e))
}

/// Flushes the guest's filesystems.
pub fn sync(sb: &Sandbox, timeout: Duration) -> Result<()> {
    let mut c = connect(sb, timeout)?;
    c.set_timeout(timeout.max(Duration::from_secs(30)));
    c.sync().map_err(|e| agent_err(sb, e))
}

/// Syncs and freezes the guest's writable filesystems; the agent thaws them
/// by itself after `auto_thaw` if nobody does. Returns what was frozen.
pub fn freeze(sb: &Sandbox, timeout: Duration, auto_thaw: Duration) -> Result<Vec<String>> {
    let mut c = connect(sb, timeout)?;
    c.sync().map_err(|e| agent_err(sb, e))?;
    c.freeze(None, auto_thaw).map_err(|e| agent_err(sb, e))
}

pub fn thaw(sb: &Sandbox, timeout: Duration) -> Result<Vec<String>> {
    let mut c = connect(sb, timeout)?;
    c.thaw().map_err(|e| agent_err(sb, e))
}

/// Sets the guest's wall clock to the host's (best effort): a restored
/// guest's clock stood still while it was a snapshot.
pub fn set_clock(sb: &Sandbox) {
    let req = ExecRequest::new(["date", "-u", "-s", &format!("@{}", clock::now())]);
    let result = connect(sb, Duration::from_secs(5))
        .and_then(|mut c| c.exec(&req).map_err(|e| agent_err(sb, e)));
    match result {
        Ok(out) if out.exit.success() => {}
        Ok(out) => log::warn!(
            "sandbox {}: setting the guest clock failed: {}",
            sb.meta.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => log::warn!("{e}"),
    }
}

/// Runs a command with its output streamed to ours; returns its exit code
/// (128+N when killed by signal N, 124 on timeout).
pub fn exec_streamed(sb: &Sandbox, req: &ExecRequest) -> Result<i32> {
    let mut c = connect(sb, Duration::from_secs(30))?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let exit = c
        .exec_streaming(req, |stream, data| {
            // A closed pipe on our side must not stop the command.
            let _ = match stream {
                OutputStream::Stdout => out.write_all(data).and_then(|_| out.flush()),
                OutputStream::Stderr => err.write_all(data).and_then(|_| err.flush()),
            };
        })
        .map_err(|e| agent_err(sb, e))?;
    Ok(exit_code(&exit))
}

/// The shell convention for how a command ended.
pub fn exit_code(exit: &ExitInfo) -> i32 {
    if exit.timed_out {
        124
    } else if let Some(sig) = exit.signal {
        128 + sig
    } else {
        exit.exit_code.unwrap_or(1)
    }
}
