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

/// How long the host waits for the agent to answer a sync or a freeze. FIFREEZE
/// waits for writes in progress, so a busy guest may take a while; a guest that
/// takes longer is treated as not answering.
pub const FREEZE_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the host tries to queue a thaw after a freeze went unanswered.
const THAW_AFTER_FAILURE_TIMEOUT: Duration = Duration::from_secs(5);

/// Syncs and freezes the guest's writable filesystems; the agent thaws them
/// by itself after `auto_thaw` if nobody does. Returns what was frozen.
///
/// Waits at most `timeout` for the agent to accept the connection and
/// [`FREEZE_ANSWER_TIMEOUT`] for each answer. When the freeze gets no answer
/// (the agent may be stuck in FIFREEZE behind a write in progress, and freeze
/// once that write ends, after we gave up), a thaw is queued before returning:
/// the agent serialises freeze and thaw, so the thaw runs as soon as that late
/// freeze completes and the guest is not left frozen until its watchdog fires.
pub fn freeze(sb: &Sandbox, timeout: Duration, auto_thaw: Duration) -> Result<Vec<String>> {
    let mut c = connect(sb, timeout)?;
    c.set_timeout(FREEZE_ANSWER_TIMEOUT);
    c.sync().map_err(|e| agent_err(sb, e))?;
    match c.freeze(None, auto_thaw) {
        Ok(frozen) => Ok(frozen),
        // The agent answered: the freeze failed and it rolled back what it had
        // frozen; a thaw now could undo someone else's freeze.
        Err(e @ client::ClientError::Agent(_)) => Err(agent_err(sb, e)),
        Err(e) => {
            drop(c);
            queue_thaw(sb);
            Err(agent_err(
                sb,
                format!(
                    "no answer to the freeze request within {}s ({e}); a thaw was queued, \
                     and the agent thaws by itself within {}s of freezing",
                    FREEZE_ANSWER_TIMEOUT.as_secs(),
                    auto_thaw.as_secs()
                ),
            ))
        }
    }
}

/// Sends a thaw without waiting long for its answer (the agent performs it even
/// after we close the connection). Failures are logged: the agent's watchdog is
/// the last resort.
fn queue_thaw(sb: &Sandbox) {
    let result = connect(sb, THAW_AFTER_FAILURE_TIMEOUT).and_then(|mut c| {
        c.set_timeout(THAW_AFTER_FAILURE_TIMEOUT);
        c.thaw().map_err(|e| agent_err(sb, e))
    });
    match result {
        Ok(thawed) => log::info!("thawed {thawed:?} after an unanswered freeze"),
        Err(e) => log::warn!("thaw after an unanswered freeze not confirmed: {e}"),
    }
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
