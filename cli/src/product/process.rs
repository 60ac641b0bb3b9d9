//! Background processes of sandboxes (their VMM, their snapshot scheduler):
//! started detached (own session, no terminal, output to a log file),
//! recognized later by pid plus command line (so a reused pid is not mistaken
//! for ours), and ended by signal.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::error::{Error, Result};

/// Starts this executable with `args` in its own session, with `cwd` as its
/// working directory and stdout/stderr appended to `log`; returns its pid.
/// The child is not waited for: it outlives the command.
pub fn spawn_detached(args: &[OsString], cwd: &Path, log: &Path) -> Result<u32> {
    let exe = std::env::current_exe().map_err(|e| Error::io("locating", Path::new("vmm"), e))?;
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::io("opening", log, e))?;
    let err = out.try_clone().map_err(|e| Error::io("opening", log, e))?;
    let mut cmd = Command::new(&exe);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only setsid, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| Error::io("starting", &exe, e))?;
    Ok(child.id())
}

/// Whether `pid` is a live (not zombie) process whose arguments include every
/// one of `markers`.
pub fn alive(pid: u32, markers: &[&str]) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state is the first field after the parenthesized command name.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    markers.iter().all(|m| args.contains(&m.as_bytes()))
}

/// Sends `signal` to `pid` (ignoring a process that is already gone).
pub fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 0 {
        return;
    }
    // SAFETY: kill has no memory effects; the pid was checked to be ours by
    // the caller (alive()).
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Waits until `pid` (with `markers`) is gone; false on timeout.
pub fn wait_gone(pid: u32, markers: &[&str], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid, markers) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A path as an argument string (the markers compare bytes).
pub fn arg(p: &Path) -> String {
    String::from_utf8_lossy(p.as_os_str().as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognizes_processes_by_arguments() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // The arguments change at exec, which may still be under way.
        let t0 = Instant::now();
        while !alive(pid, &["30"]) && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(alive(pid, &["30"]));
        assert!(alive(pid, &["sleep", "30"]));
        assert!(!alive(pid, &["31"]));
        signal(pid, libc::SIGKILL);
        // Until reaped it is a zombie, which does not count as alive.
        assert!(wait_gone(pid, &["30"], Duration::from_secs(5)));
        child.wait().unwrap();
        assert!(!alive(u32::MAX, &[]));
    }
}
