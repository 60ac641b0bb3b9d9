//! Pseudo-terminals for `exec_tty`: opening a pair, starting a program as the
//! leader of a new session with the slave as its controlling terminal, finding
//! the login shell, and signalling or checking on the program without reaping
//! it (so its process-group id cannot be reused while we may still signal it).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::proto::{ExecTtyRequest, WindowSize, DEFAULT_TERM};
use crate::sys::{self, cvt};

/// Why a terminal program could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The request cannot be run as given.
    #[error("invalid exec_tty request: {0}")]
    Invalid(String),
    /// No pseudo-terminal could be allocated (is devpts mounted on /dev/pts?).
    #[error("opening a pseudo-terminal ({context}): {source}")]
    OpenPty {
        /// The step that failed.
        context: &'static str,
        /// Underlying error.
        source: io::Error,
    },
    /// The program could not be started on the terminal.
    #[error("failed to spawn {program:?} on {tty}: {source}")]
    Spawn {
        /// What was run (the login shell's path if none was asked for).
        program: String,
        /// The slave device, e.g. `/dev/pts/3`.
        tty: String,
        /// Underlying error (not found, permission, bad cwd, ...).
        source: io::Error,
    },
}

/// A pseudo-terminal pair; both ends close on exec.
#[derive(Debug)]
pub struct Pty {
    /// The agent's end.
    pub master: OwnedFd,
    /// The program's end (its stdin, stdout and stderr).
    pub slave: OwnedFd,
    /// The slave's path, e.g. `/dev/pts/3`.
    pub name: String,
}

impl Pty {
    /// Allocates a pair through `/dev/ptmx`, sized `size`.
    pub fn open(size: WindowSize) -> Result<Self, SpawnError> {
        let err = |context| move |source| SpawnError::OpenPty { context, source };
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: posix_openpt takes flags only and returns a new descriptor.
        let raw = cvt(unsafe { libc::posix_openpt(flags) }).map_err(err("posix_openpt"))?;
        // SAFETY: `raw` is a freshly opened descriptor nothing else owns.
        let master = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: grantpt and unlockpt act on the descriptor we own; no memory is passed.
        cvt(unsafe { libc::grantpt(master.as_raw_fd()) }).map_err(err("grantpt"))?;
        // SAFETY: as above.
        cvt(unsafe { libc::unlockpt(master.as_raw_fd()) }).map_err(err("unlockpt"))?;
        let mut buf = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes a NUL-terminated name of at most `buf.len()`
        // bytes into `buf`, which outlives the call.
        let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if rc != 0 {
            return Err(err("ptsname_r")(io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated string.
        let cname = unsafe { CStr::from_ptr(buf.as_ptr()) };
        // SAFETY: `cname` is a valid NUL-terminated path for the call.
        let raw = cvt(unsafe { libc::open(cname.as_ptr(), flags) }).map_err(err("open slave"))?;
        // SAFETY: `raw` is a freshly opened descriptor nothing else owns.
        let slave = unsafe { OwnedFd::from_raw_fd(raw) };
        sys::set_window_size(master.as_fd(), size).map_err(err("TIOCSWINSZ"))?;
        sys::set_nonblocking(master.as_fd()).map_err(err("O_NONBLOCK"))?;
        Ok(Self {
            master,
            slave,
            name: cname.to_string_lossy().into_owned(),
        })
    }
}

/// The character the terminal's line discipline reads as end of file
/// (Ctrl-D unless the program changed it). Termios requests on a master act
/// on its slave.
pub fn eof_char(master: BorrowedFd<'_>) -> u8 {
    // SAFETY: termios is plain old data; all-zero is a valid value.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into `t`, which outlives the call.
    let ok = unsafe { libc::tcgetattr(master.as_raw_fd(), &mut t) } == 0;
    match t.c_cc[libc::VEOF] {
        // 0 is _POSIX_VDISABLE on Linux.
        c if ok && c != 0 => c,
        _ => 0x04,
    }
}

/// A user's login shell and home from `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginShell {
    /// The shell's path.
    pub shell: String,
    /// The home directory, if known.
    pub home: Option<String>,
    /// The user name, if known.
    pub user: Option<String>,
}

/// Finds the entry of `uid` in passwd-format `text`.
pub fn parse_passwd(text: &str, uid: u32) -> Option<LoginShell> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[2].parse::<u32>().ok()? != uid {
            return None;
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Some(LoginShell {
            shell: non_empty(f[6]).unwrap_or_else(|| "/bin/sh".into()),
            home: non_empty(f[5]),
            user: non_empty(f[0]),
        })
    })
}

/// The login shell of the agent's user: `/etc/passwd`, else `$SHELL`, else
/// `/bin/sh`.
pub fn login_shell() -> LoginShell {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| parse_passwd(&text, uid))
        .unwrap_or_else(|| LoginShell {
            shell: std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into()),
            home: std::env::var("HOME").ok(),
            user: None,
        })
}

/// Starts the requested program (or the login shell) on `pty` as the leader
/// of a new session whose controlling terminal is the slave. Returns the
/// child and what was run.
pub fn spawn(req: &ExecTtyRequest, pty: &Pty) -> Result<(Child, String), SpawnError> {
    let mut env = Vec::with_capacity(req.env.len());
    for kv in &req.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k, v)),
            _ => {
                return Err(SpawnError::Invalid(format!(
                    "env entry {kv:?} is not KEY=VALUE"
                )))
            }
        }
    }
    let (mut cmd, program) = match req.argv.split_first() {
        Some((p, _)) if p.is_empty() => return Err(SpawnError::Invalid("argv[0] is empty".into())),
        Some((p, args)) => {
            let mut cmd = Command::new(p);
            cmd.args(args);
            if let Some(cwd) = &req.cwd {
                cmd.current_dir(cwd);
            }
            (cmd, p.clone())
        }
        None => login_command(req.cwd.as_deref()),
    };
    let term = req.term.as_deref().unwrap_or(DEFAULT_TERM);
    cmd.env("TERM", term).envs(env);
    let stdio = |what: &'static str| {
        pty.slave
            .try_clone()
            .map(Stdio::from)
            .map_err(|source| SpawnError::OpenPty {
                context: what,
                source,
            })
    };
    cmd.stdin(stdio("dup slave")?)
        .stdout(stdio("dup slave")?)
        .stderr(stdio("dup slave")?);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // two async-signal-safe system calls (no allocation, no locks). setsid
    // makes the child a session and group leader without a terminal;
    // TIOCSCTTY then makes its stdin (the slave, already in place) the
    // session's controlling terminal, so Ctrl-C and job control work.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| SpawnError::Spawn {
        program: program.clone(),
        tty: pty.name.clone(),
        source,
    })?;
    // `cmd` (and its three slave duplicates) is dropped here: only the child
    // holds the slave now, besides `pty.slave`.
    Ok((child, program))
}

/// The login shell as a login shell (`argv[0]` = `-sh`, the convention every
/// shell understands), with the variables `login` would set, in its home
/// unless `cwd` says otherwise.
fn login_command(cwd: Option<&str>) -> (Command, String) {
    let login = login_shell();
    let base = Path::new(&login.shell)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    let mut cmd = Command::new(&login.shell);
    cmd.arg0(format!("-{base}")).env("SHELL", &login.shell);
    if let Some(user) = &login.user {
        cmd.env("USER", user).env("LOGNAME", user);
    }
    if let Some(home) = &login.home {
        cmd.env("HOME", home);
    }
    match (cwd, &login.home) {
        (Some(dir), _) => {
            cmd.current_dir(dir);
        }
        (None, Some(home)) if Path::new(home).is_dir() => {
            cmd.current_dir(home);
        }
        _ => {}
    }
    (cmd, login.shell)
}

/// Sends `sig` to process group `pgid`; errors (group gone) are moot.
pub fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid <= 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours. A
    // negative pid addresses the group our child leads; callers only signal
    // it while the child is unreaped, so the id cannot have been reused.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// The live processes of session `sid` (from `/proc`; zombies, which no
/// signal reaches any more, are left out); used to hang up or kill a
/// session's background jobs, which live in process groups of their own.
pub fn session_members(sid: libc::pid_t) -> Vec<libc::pid_t> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| stat_state_session(&stat))
                .is_some_and(|(state, session)| session == sid && !matches!(state, 'Z' | 'X'))
        })
        .collect()
}

/// The state and session id in a `/proc/PID/stat` line: the first and
/// fourth fields after the command name, which is in parentheses and may
/// itself contain any byte.
fn stat_state_session(stat: &str) -> Option<(char, libc::pid_t)> {
    let (_, rest) = stat.rsplit_once(')')?;
    // state ppid pgrp session
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    Some((state, fields.nth(2)?.parse().ok()?))
}

/// Sends `sig` to one process; errors (process gone) are moot.
pub fn signal_process(pid: libc::pid_t, sig: libc::c_int) {
    if pid <= 0 {
        return;
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// True once `pid` (our child) has exited, leaving it unreaped (`WNOWAIT`).
pub fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid writes one siginfo_t into `info`, which outlives the call.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        match cvt(rc) {
            // SAFETY: waitid filled `info`; si_pid stays 0 when the child runs.
            Ok(_) => return Ok(unsafe { info.si_pid() } != 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup() {
        let text = "root:x:0:0:root:/root:/bin/ash\n\
                    broken line\n\
                    nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
                    empty:x:1000:1000:::\n";
        assert_eq!(
            parse_passwd(text, 0),
            Some(LoginShell {
                shell: "/bin/ash".into(),
                home: Some("/root".into()),
                user: Some("root".into()),
            })
        );
        assert_eq!(
            parse_passwd(text, 1000),
            Some(LoginShell {
                shell: "/bin/sh".into(),
                home: None,
                user: Some("empty".into()),
            })
        );
        assert_eq!(parse_passwd(text, 5), None);
    }

    #[test]
    fn stat_parsing_and_own_session() {
        assert_eq!(
            stat_state_session("12 (a) b) c) S 1 12 34 0 -1"),
            Some(('S', 34))
        );
        assert_eq!(stat_state_session("13 (z) Z 1 13 13 0"), Some(('Z', 13)));
        assert_eq!(stat_state_session("12 (x) S 1"), None);
        assert_eq!(stat_state_session("garbage"), None);
        // SAFETY: getsid(0) only queries our own session id.
        let sid = unsafe { libc::getsid(0) };
        assert!(session_members(sid).contains(&(std::process::id() as libc::pid_t)));
    }

    #[test]
    fn open_sets_size_and_names_the_slave() {
        let pty = Pty::open(WindowSize {
            rows: 33,
            cols: 101,
        })
        .unwrap();
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
        assert_eq!(
            sys::window_size(pty.slave.as_fd()),
            Some(WindowSize {
                rows: 33,
                cols: 101
            })
        );
        assert_eq!(eof_char(pty.master.as_fd()), 0x04);
    }

    #[test]
    fn bad_requests_are_refused() {
        let pty = Pty::open(WindowSize::default()).unwrap();
        let req = ExecTtyRequest {
            argv: vec!["true".into()],
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(matches!(spawn(&req, &pty), Err(SpawnError::Invalid(_))));
        let req = ExecTtyRequest {
            argv: vec!["/nonexistent/program".into()],
            ..Default::default()
        };
        match spawn(&req, &pty) {
            Err(SpawnError::Spawn { program, tty, .. }) => {
                assert_eq!(program, "/nonexistent/program");
                assert_eq!(tty, pty.name);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
