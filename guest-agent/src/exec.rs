//! Running programs for `exec`.
//!
//! The child gets its own process group so a timeout can kill it together with
//! everything it started. One thread multiplexes stdin, stdout and stderr with
//! `poll(2)` over non-blocking pipes, so neither a large stdin nor a chatty
//! child can deadlock the agent. Once the direct child has exited, the pipes
//! are drained until end of file or for [`EXIT_GRACE`] at most, so a
//! background process that keeps the pipes open cannot hang the request.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::proto::{ExecOutput, ExecRequest, ExitInfo, OutputStream, MAX_COLLECT_OUTPUT};

/// How long to keep reading output after the direct child exited while some
/// other process still holds the pipes open.
pub const EXIT_GRACE: Duration = Duration::from_millis(250);

/// Longest single sleep of the loop while the child runs; bounds how late a
/// timeout or an exit with pipes held elsewhere is noticed.
const MAX_TICK: Duration = Duration::from_millis(50);

/// Read size; also the largest chunk a streaming `output` frame carries.
const CHUNK: usize = 64 * 1024;

/// Exec failures. A non-zero exit is not an error; these are.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The request cannot be run as given.
    #[error("invalid exec request: {0}")]
    Invalid(String),
    /// The program could not be started.
    #[error("failed to spawn {program:?}: {source}")]
    Spawn {
        /// `argv[0]`.
        program: String,
        /// Underlying error (not found, permission, bad cwd, ...).
        source: io::Error,
    },
    /// A system call failed while the child ran.
    #[error("exec of {program:?} failed while {context}: {source}")]
    Io {
        /// `argv[0]`.
        program: String,
        /// What the agent was doing.
        context: &'static str,
        /// Underlying error.
        source: io::Error,
    },
}

/// Runs the request and collects its output within the per-stream limit.
pub fn run_collect(req: &ExecRequest) -> Result<ExecOutput, ExecError> {
    let limit = req
        .max_output_bytes
        .unwrap_or(MAX_COLLECT_OUTPUT)
        .min(MAX_COLLECT_OUTPUT);
    // Cannot truncate: limit <= MAX_COLLECT_OUTPUT, which fits in usize.
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut out = Collector::new(limit);
    let mut err = Collector::new(limit);
    let exit = run(req, &mut |stream, data| {
        match stream {
            OutputStream::Stdout => out.push(data),
            OutputStream::Stderr => err.push(data),
        }
        Ok(())
    })?;
    Ok(ExecOutput {
        exit,
        stdout: out.buf,
        stderr: err.buf,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
    })
}

/// Output kept up to a limit; the excess is counted as truncation.
struct Collector {
    buf: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Collector {
    fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            truncated: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.buf.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// Sink for output chunks; an error (the client went away) kills the child.
pub type OutputSink<'a> = dyn FnMut(OutputStream, &[u8]) -> io::Result<()> + 'a;

/// Runs the request, passing output chunks to `sink` in the order they are
/// read, and returns how the child ended.
pub fn run(req: &ExecRequest, sink: &mut OutputSink<'_>) -> Result<ExitInfo, ExecError> {
    let program = match req.argv.first() {
        Some(p) if !p.is_empty() => p.clone(),
        _ => return Err(ExecError::Invalid("argv is empty".into())),
    };
    let mut cmd = Command::new(&program);
    cmd.args(&req.argv[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for kv in &req.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                cmd.env(k, v);
            }
            _ => {
                return Err(ExecError::Invalid(format!(
                    "env entry {kv:?} is not KEY=VALUE"
                )))
            }
        }
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let start = Instant::now();
    let deadline = req
        .timeout_ms
        .and_then(|ms| start.checked_add(Duration::from_millis(ms)));
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        program: program.clone(),
        source,
    })?;
    let io_err = |context: &'static str| {
        let program = program.clone();
        move |source| ExecError::Io {
            program,
            context,
            source,
        }
    };
    // The child leads its own group, so its pid is the group id.
    let pgid = child.id() as libc::pid_t;

    let mut pipes = Pipes {
        stdout: child.stdout.take().map(pipe_file),
        stderr: child.stderr.take().map(pipe_file),
        stdin: child.stdin.take().map(pipe_file),
        stdin_data: &req.stdin,
        stdin_pos: 0,
    };
    let setup = pipes.set_nonblocking();
    if req.stdin.is_empty() {
        pipes.stdin = None;
    }
    if let Err(e) = setup {
        kill_group(pgid);
        let _ = child.wait();
        return Err(io_err("setting pipes non-blocking")(e));
    }

    let mut status: Option<ExitStatus> = None;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut idle_tick = Duration::from_millis(1);
    let mut buf = vec![0u8; CHUNK];
    loop {
        if status.is_none() {
            status = child.try_wait().map_err(io_err("waiting for the child"))?;
            if status.is_some() {
                exited_at = Some(Instant::now());
            }
        }
        let now = Instant::now();
        if let Some(at) = exited_at {
            if !pipes.output_open() || now.duration_since(at) >= EXIT_GRACE {
                break;
            }
        }
        if let Some(d) = deadline {
            if status.is_none() && !timed_out && now >= d {
                kill_group(pgid);
                timed_out = true;
            }
        }

        let mut wait = match exited_at {
            Some(at) => EXIT_GRACE.saturating_sub(now.duration_since(at)),
            None if pipes.any_open() => MAX_TICK,
            None => {
                // Only the exit is left to wait for: back off gently.
                let t = idle_tick;
                idle_tick = (idle_tick * 2).min(MAX_TICK);
                t
            }
        };
        if let (Some(d), false) = (deadline, timed_out) {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let ready = pipes.poll(wait).map_err(io_err("polling the pipes"))?;
        if let Err(e) = pipes.service(ready, &mut buf, sink) {
            // The sink failed (client gone) or a pipe read failed: stop the child.
            kill_group(pgid);
            let _ = child.wait();
            return Err(io_err("forwarding output")(e));
        }
    }
    drop(pipes);
    // The loop only ends once the child has been reaped.
    let status = match status {
        Some(s) => s,
        None => child.wait().map_err(io_err("waiting for the child"))?,
    };
    Ok(ExitInfo {
        exit_code: status.code(),
        signal: status.signal(),
        timed_out,
        duration_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

fn pipe_file<T: Into<OwnedFd>>(p: T) -> File {
    File::from(p.into())
}

/// Sends SIGKILL to the whole process group; errors (group gone) are moot.
fn kill_group(pgid: libc::pid_t) {
    if pgid <= 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; a
    // negative pid addresses the process group we created for the child,
    // whose id cannot be reused while any member (or the unreaped leader) exists.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl F_GETFL on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl F_SETFL on a descriptor we own with an integer argument.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which pipes `poll` reported as ready (readable, writable, or hung up).
#[derive(Default)]
struct Ready {
    stdout: bool,
    stderr: bool,
    stdin: bool,
}

/// The child's pipes; `None` once closed.
struct Pipes<'a> {
    stdout: Option<File>,
    stderr: Option<File>,
    stdin: Option<File>,
    stdin_data: &'a [u8],
    stdin_pos: usize,
}

impl Pipes<'_> {
    fn set_nonblocking(&self) -> io::Result<()> {
        for f in [&self.stdout, &self.stderr, &self.stdin]
            .into_iter()
            .flatten()
        {
            set_nonblocking(f.as_raw_fd())?;
        }
        Ok(())
    }

    fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    fn any_open(&self) -> bool {
        self.output_open() || self.stdin.is_some()
    }

    /// Waits up to `timeout` for any open pipe to become ready.
    fn poll(&self, timeout: Duration) -> io::Result<Ready> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, f, events) in [
            (0, &self.stdout, libc::POLLIN),
            (1, &self.stderr, libc::POLLIN),
            (2, &self.stdin, libc::POLLOUT),
        ] {
            if let Some(f) = f {
                fds.push(libc::pollfd {
                    fd: f.as_raw_fd(),
                    events,
                    revents: 0,
                });
                which.push(i);
            }
        }
        // Round up so a sub-millisecond wait does not become a busy loop.
        let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(ms as u64));
            return Ok(Ready::default());
        }
        // SAFETY: `fds` is a valid, initialized slice of pollfd and we pass its
        // exact length; poll only writes the `revents` fields.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Ready::default());
            }
            return Err(e);
        }
        let mut ready = Ready::default();
        for (pfd, i) in fds.iter().zip(which) {
            if pfd.revents != 0 {
                match i {
                    0 => ready.stdout = true,
                    1 => ready.stderr = true,
                    _ => ready.stdin = true,
                }
            }
        }
        Ok(ready)
    }

    /// Moves data for every ready pipe; closes pipes at EOF or on EPIPE.
    fn service(
        &mut self,
        ready: Ready,
        buf: &mut [u8],
        sink: &mut OutputSink<'_>,
    ) -> io::Result<()> {
        if ready.stdout {
            drain(&mut self.stdout, OutputStream::Stdout, buf, sink)?;
        }
        if ready.stderr {
            drain(&mut self.stderr, OutputStream::Stderr, buf, sink)?;
        }
        if ready.stdin {
            self.feed_stdin();
        }
        Ok(())
    }

    /// Writes as much pending stdin as the pipe takes; closes it when done or
    /// when the child stopped reading (EPIPE): that is the child's business.
    fn feed_stdin(&mut self) {
        let Some(f) = self.stdin.as_mut() else {
            return;
        };
        while self.stdin_pos < self.stdin_data.len() {
            match f.write(&self.stdin_data[self.stdin_pos..]) {
                Ok(0) => break,
                Ok(n) => self.stdin_pos += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => break,
            }
        }
        self.stdin = None;
    }
}

/// Reads everything currently available from one output pipe into the sink.
fn drain(
    pipe: &mut Option<File>,
    stream: OutputStream,
    buf: &mut [u8],
    sink: &mut OutputSink<'_>,
) -> io::Result<()> {
    let Some(f) = pipe.as_mut() else {
        return Ok(());
    };
    loop {
        match f.read(buf) {
            Ok(0) => {
                *pipe = None;
                return Ok(());
            }
            Ok(n) => sink(stream, &buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ExecRequest {
        ExecRequest::new(["sh", "-c", script])
    }

    #[test]
    fn echo_and_exit_codes() {
        let out = run_collect(&ExecRequest::new(["echo", "hello", "world"])).unwrap();
        assert_eq!(out.stdout, b"hello world\n");
        assert!(out.exit.success());
        let out = run_collect(&sh("echo err >&2; exit 3")).unwrap();
        assert_eq!(out.exit.exit_code, Some(3));
        assert_eq!(out.stderr, b"err\n");
        assert!(!out.exit.success());
    }

    #[test]
    fn signal_reported() {
        let out = run_collect(&sh("kill -TERM $$")).unwrap();
        assert_eq!(out.exit.exit_code, None);
        assert_eq!(out.exit.signal, Some(libc::SIGTERM));
    }

    #[test]
    fn large_stdin_passthrough_without_deadlock() {
        // Larger than a pipe buffer in both directions.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut req = ExecRequest::new(["cat"]);
        req.stdin = data.clone();
        let out = run_collect(&req).unwrap();
        assert!(out.exit.success());
        assert_eq!(out.stdout.len(), data.len());
        assert!(out.stdout == data);
    }

    #[test]
    fn env_and_cwd() {
        let dir = std::env::temp_dir();
        let mut req = sh("echo \"$FOO:$BAR\"; pwd -P");
        req.env = vec!["FOO=a=b".into(), "BAR=".into()];
        req.cwd = Some(dir.to_string_lossy().into_owned());
        let out = run_collect(&req).unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let canon = dir.canonicalize().unwrap();
        assert_eq!(text, format!("a=b:\n{}\n", canon.display()));
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(matches!(
            run_collect(&ExecRequest::new(Vec::<String>::new())),
            Err(ExecError::Invalid(_))
        ));
        let mut req = ExecRequest::new(["true"]);
        req.env = vec!["NOEQUALS".into()];
        assert!(matches!(run_collect(&req), Err(ExecError::Invalid(_))));
        assert!(matches!(
            run_collect(&ExecRequest::new(["/nonexistent/program"])),
            Err(ExecError::Spawn { .. })
        ));
        let mut req = ExecRequest::new(["true"]);
        req.cwd = Some("/nonexistent/dir".into());
        assert!(matches!(run_collect(&req), Err(ExecError::Spawn { .. })));
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let marker = std::env::temp_dir().join(format!("ga-exec-timeout-{}", std::process::id()));
        let _ = std::fs::remove_file(&marker);
        // The grandchild would create the marker after 1 s unless killed with the group.
        let mut req = sh(&format!(
            "(sleep 1; touch {}) & echo started; sleep 30",
            marker.display()
        ));
        req.timeout_ms = Some(200);
        let t = Instant::now();
        let out = run_collect(&req).unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(out.exit.timed_out);
        assert_eq!(out.exit.signal, Some(libc::SIGKILL));
        assert_eq!(out.stdout, b"started\n");
        std::thread::sleep(Duration::from_millis(1300));
        assert!(!marker.exists(), "grandchild survived the timeout");
    }

    #[test]
    fn background_process_holding_pipes_does_not_hang() {
        let t = Instant::now();
        let out = run_collect(&sh("setsid sleep 5 & echo done")).unwrap();
        assert!(out.exit.success());
        assert_eq!(out.stdout, b"done\n");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn output_truncated_at_limit() {
        let mut req = sh("head -c 100000 /dev/zero; echo x >&2");
        req.max_output_bytes = Some(1000);
        let out = run_collect(&req).unwrap();
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated);
        assert!(!out.stderr_truncated);
        assert_eq!(out.stderr, b"x\n");
    }

    #[test]
    fn streaming_preserves_order_and_sink_error_kills() {
        let mut chunks = Vec::new();
        let exit = run(
            &sh("echo one; sleep 0.1; echo two >&2; sleep 0.1; echo three"),
            &mut |s, d| {
                chunks.push((s, d.to_vec()));
                Ok(())
            },
        )
        .unwrap();
        assert!(exit.success());
        assert_eq!(
            chunks,
            vec![
                (OutputStream::Stdout, b"one\n".to_vec()),
                (OutputStream::Stderr, b"two\n".to_vec()),
                (OutputStream::Stdout, b"three\n".to_vec()),
            ]
        );

        let t = Instant::now();
        let r = run(&sh("echo x; sleep 30"), &mut |_, _| {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        });
        assert!(matches!(r, Err(ExecError::Io { .. })));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
