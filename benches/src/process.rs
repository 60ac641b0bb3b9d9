//! Child processes: bounded waits, and a guard that kills on drop so no
//! guest outlives a failed scenario.

use std::io::Read;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits up to `grace` for `child` to exit, then kills it; returns its
/// status when it could be reaped.
pub fn wait_or_kill(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if t.elapsed() < grace => std::thread::sleep(Duration::from_millis(5)),
            _ => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Asks `child` to stop with SIGTERM, then kills it after `grace`.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child we have not reaped yet, so
        // the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    wait_or_kill(child, grace)
}

/// What an exited child wrote to its piped stderr (last 500 bytes).
pub fn read_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    let text = text.trim();
    let cut = text.len().saturating_sub(500);
    let cut = (cut..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[cut..].to_string()
}

/// A child killed (and reaped) on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        wait_or_kill(&mut self.0, Duration::ZERO);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn kills_a_child_that_does_not_exit() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let t = Instant::now();
        let status = wait_or_kill(&mut child, Duration::from_millis(50)).unwrap();
        assert!(!status.success());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn terminate_and_stderr() {
        let mut child = Command::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = wait_or_kill(&mut child, Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(read_stderr(&mut child), "oops");
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        assert!(!terminate(&mut child, Duration::from_secs(5))
            .unwrap()
            .success());
    }
}
