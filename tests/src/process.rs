//! Running commands with a hard timeout, and running build scripts with their chatter in a log.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{HarnessError, Result};

/// How often a waiting loop polls its child.
const POLL: Duration = Duration::from_millis(20);

/// The output of a command run under a timeout.
#[derive(Debug)]
pub struct TimedOutput {
    /// Exit status and captured stdout/stderr (status is "killed by SIGKILL" after a timeout).
    pub output: Output,
    /// True when the command was killed because it exceeded its timeout.
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

impl TimedOutput {
    /// Stdout as text (lossy).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    /// Stderr as text (lossy).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// True when the command exited by itself with status 0.
    pub fn success(&self) -> bool {
        !self.timed_out && self.output.status.success()
    }
}

/// Describes a command for messages: program and arguments.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Kills the whole process group of `child` (it was spawned as a group leader), then reaps it.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a negative pid signals the process group we created for this
        // child; it does not touch memory.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// How a watched wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The child exited by itself.
    Exited(ExitStatus),
    /// The deadline passed; the child's process group was killed.
    TimedOut,
    /// `stalled` said the child stopped making progress; its process group was killed.
    Stalled,
}

/// Waits for `child` up to `timeout`; kills its process group when the time is up.
/// Returns the exit status and whether it timed out.
pub(crate) fn wait_with_deadline(
    child: &mut Child,
    timeout: Duration,
    what: &str,
) -> Result<(ExitStatus, bool)> {
    Ok(match wait_watched(child, timeout, what, || false)? {
        WaitEnd::Exited(status) => (status, false),
        WaitEnd::TimedOut | WaitEnd::Stalled => (ExitStatus::from_raw(libc::SIGKILL), true),
    })
}

/// Waits for `child` up to `timeout`, also killing its process group as soon as `stalled`
/// returns true (checked between polls).
pub(crate) fn wait_watched(
    child: &mut Child,
    timeout: Duration,
    what: &str,
    stalled: impl Fn() -> bool,
) -> Result<WaitEnd> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(WaitEnd::Exited(status)),
            Ok(None) if Instant::now() >= deadline => {
                kill_group(child);
                return Ok(WaitEnd::TimedOut);
            }
            Ok(None) if stalled() => {
                kill_group(child);
                return Ok(WaitEnd::Stalled);
            }
            Ok(None) => std::thread::sleep(POLL),
            Err(e) => {
                kill_group(child);
                return Err(HarnessError::Spawn {
                    command: what.to_string(),
                    source: e,
                });
            }
        }
    }
}

fn drain<R: Read + Send + 'static>(reader: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = reader {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs `cmd` with stdin closed and stdout/stderr captured; kills it (and its process group)
/// after `timeout`. Panics only if the command cannot be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> TimedOutput {
    try_run_with_timeout(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`run_with_timeout`] returning errors instead of panicking.
pub fn try_run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<TimedOutput> {
    let what = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            command: what.clone(),
            source,
        })?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let (status, timed_out) = wait_with_deadline(&mut child, timeout, &what)?;
    // After a kill, a grandchild may still hold the pipes; the group kill covers those we made.
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    Ok(TimedOutput {
        output: Output {
            status,
            stdout,
            stderr,
        },
        timed_out,
        elapsed: start.elapsed(),
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a build step with stdin closed, stdout captured and stderr appended to `log`; returns
/// stdout. On failure the error carries the log's tail and path.
pub(crate) fn run_logged(cmd: &mut Command, log: &Path) -> Result<String> {
    let what = describe(cmd);
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| HarnessError::io("create directory", parent, e))?;
    }
    let log_file = File::create(log).map_err(|e| HarnessError::io("create", log, e))?;
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .output()
        .map_err(|source| HarnessError::Spawn {
            command: what.clone(),
            source,
        })?;
    if !output.status.success() {
        let log_text = std::fs::read_to_string(log).unwrap_or_default();
        return Err(HarnessError::CommandFailed {
            command: what,
            status: output.status,
            output: format!("{}\n(full log: {})", tail(&log_text, 40), log.display()),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last non-empty line of a script's stdout: the artifact path by our scripts' convention.
pub(crate) fn last_line(stdout: &str, what: &str) -> Result<String> {
    stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| HarnessError::BadOutput {
            command: what.to_string(),
            detail: "no output line".to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_status() {
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert!(!out.timed_out);
        assert_eq!(out.output.status.code(), Some(3));
        assert_eq!(out.stdout(), "out\n");
        assert_eq!(out.stderr(), "err\n");
        assert!(!out.success());
    }

    #[test]
    fn kills_on_timeout_including_grandchildren() {
        let start = Instant::now();
        // The grandchild keeps stdout open: the group kill must end it too, or join would hang.
        let out = run_with_timeout(
            Command::new("sh").args(["-c", "sleep 30 & sleep 30; echo never"]),
            Duration::from_millis(300),
        );
        assert!(out.timed_out);
        assert!(!out.success());
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(out.stdout(), "");
    }

    #[test]
    fn tail_and_last_line() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(last_line("x\n/path/y\n\n", "t").unwrap(), "/path/y");
        assert!(last_line("\n", "t").is_err());
    }
}
