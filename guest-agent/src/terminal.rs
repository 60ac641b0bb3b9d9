//! The host's own terminal during an interactive session: raw mode (so every
//! key, Ctrl-C included, goes to the guest instead of being handled here),
//! window-size changes (SIGWINCH) and the signals that end a session from
//! this side (SIGTERM, SIGHUP, SIGQUIT) turned into something `poll` can wait
//! for, and the ssh-style `~.` escape that leaves a session which no longer
//! answers.
//!
//! Raw mode and the signal handlers are guards: dropping them restores the
//! terminal settings and the previous signal dispositions, which also happens
//! while a panic unwinds.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::proto::WindowSize;
use crate::sys::{self, cvt};

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
}

/// Whether `fd` is a pipe or a regular file: input somebody gave on purpose
/// (`echo ls | vmm ...`, `vmm ... < script`), which ends. Terminals, other
/// character devices (`/dev/null`), sockets and closed descriptors are not:
/// a service manager's or `ssh` without `-t`'s stdin may never end.
pub fn is_pipe_or_file(fd: BorrowedFd<'_>) -> bool {
    let Ok(dup) = fd.try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(dup)
        .metadata()
        .is_ok_and(|m| m.file_type().is_fifo() || m.file_type().is_file())
}

/// A terminal in raw mode until dropped.
pub struct RawMode<'a> {
    fd: BorrowedFd<'a>,
    saved: libc::termios,
}

impl<'a> RawMode<'a> {
    /// Puts terminal `fd` in raw mode (no echo, no line editing, no signal
    /// keys, no output post-processing: the guest's terminal does all that).
    pub fn enable(fd: BorrowedFd<'a>) -> io::Result<Self> {
        // SAFETY: termios is plain old data; all-zero is a valid value.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes one termios into `saved`, which outlives the call.
        cvt(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut saved) })?;
        let mut raw = saved;
        make_raw(&mut raw);
        // SAFETY: tcsetattr only reads `raw`, which outlives the call.
        cvt(unsafe { libc::tcsetattr(fd.as_raw_fd(), libc::TCSADRAIN, &raw) })?;
        Ok(Self { fd, saved })
    }
}

impl Drop for RawMode<'_> {
    fn drop(&mut self) {
        // SAFETY: tcsetattr only reads `saved`, which outlives the call; the
        // descriptor is borrowed for the guard's lifetime.
        let rc = unsafe { libc::tcsetattr(self.fd.as_raw_fd(), libc::TCSADRAIN, &self.saved) };
        if rc != 0 {
            // Not eprintln!: after a hang-up stderr may be the dead terminal,
            // and a failed write must not become a panic here.
            let _ = writeln!(
                io::stderr(),
                "vmm: restoring the terminal settings: {} (try `stty sane`)",
                io::Error::last_os_error()
            );
        }
    }
}

/// What `cfmakeraw(3)` does (not every libc the agent crate builds with
/// exports it).
fn make_raw(t: &mut libc::termios) {
    t.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    t.c_oflag &= !libc::OPOST;
    t.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    t.c_cflag &= !(libc::CSIZE | libc::PARENB);
    t.c_cflag |= libc::CS8;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
}

/// Signals that end an interactive session from this side: the relay stops,
/// the terminal is restored and the client exits with 128+N. SIGINT is not
/// among them: in raw mode Ctrl-C is a key for the guest.
pub const SESSION_END_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// Write end of the pipe the signal handler writes to; -1 when none is
/// installed. Only one watcher may exist at a time (handlers are global).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

/// The first of [`SESSION_END_SIGNALS`] received since the watcher was
/// installed; 0 for none.
static END_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig != libc::SIGWINCH {
        let _ = END_SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    }
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    // Signal numbers fit in a byte; the reader only compares them.
    let byte = sig as u8;
    // SAFETY: __errno_location returns this thread's errno slot; saving and
    // restoring it keeps the interrupted code's errno intact. write(2) is
    // async-signal-safe; the byte lives on this stack frame. A full pipe
    // (EAGAIN) already holds a pending notification.
    unsafe {
        let errno = *libc::__errno_location();
        libc::write(fd, (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// Turns SIGWINCH and [`SESSION_END_SIGNALS`] into readability of
/// [`SignalWatcher::fd`] (the self-pipe trick), reports the new size of
/// terminal `tty` after SIGWINCH and remembers the first ending signal. The
/// previous dispositions are restored on drop. A signal ignored when the
/// watcher is installed (`nohup`) stays ignored.
pub struct SignalWatcher<'a> {
    tty: Option<BorrowedFd<'a>>,
    read: OwnedFd,
    write: OwnedFd,
    /// The dispositions replaced, restored on drop.
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl<'a> SignalWatcher<'a> {
    /// Installs the handlers; sizes are measured on `tty` (none without
    /// one). Fails if another watcher is installed.
    pub fn install(tty: Option<BorrowedFd<'a>>) -> io::Result<Self> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if SIGNAL_PIPE
            .compare_exchange(-1, write.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a signal watcher is already installed",
            ));
        }
        END_SIGNAL.store(0, Ordering::SeqCst);
        // From here on, dropping the watcher undoes whatever was installed.
        let mut watcher = Self {
            tty,
            read,
            write,
            previous: Vec::new(),
        };
        for sig in std::iter::once(libc::SIGWINCH).chain(SESSION_END_SIGNALS) {
            // SAFETY: sigaction is plain old data; all-zero is a valid value.
            let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a query: sigaction only writes `current`, which outlives the call.
            cvt(unsafe { libc::sigaction(sig, std::ptr::null(), &mut current) })?;
            if sig != libc::SIGWINCH && current.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            // SAFETY: as above.
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SIGWINCH restarts interrupted calls. The ending signals must
            // not: a write to a local output nobody reads has to fail with
            // EINTR so the relay can give up on it.
            action.sa_flags = if sig == libc::SIGWINCH {
                libc::SA_RESTART
            } else {
                0
            };
            // SAFETY: as above.
            let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both structs outlive the call; the handler only does
            // async-signal-safe work (atomics and write(2)).
            cvt(unsafe { libc::sigaction(sig, &action, &mut previous) })?;
            watcher.previous.push((sig, previous));
        }
        Ok(watcher)
    }

    /// Readable after a signal; poll it, then call [`Self::take_resize`]
    /// and [`Self::end_signal`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Consumes the notifications; the terminal's current size if a
    /// SIGWINCH was among them.
    pub fn take_resize(&self) -> Option<WindowSize> {
        let mut buf = [0u8; 64];
        let mut resized = false;
        while let Ok(n @ 1..) = sys::read(self.read.as_fd(), &mut buf) {
            resized |= buf[..n].contains(&(libc::SIGWINCH as u8));
        }
        if resized {
            self.tty.and_then(sys::window_size)
        } else {
            None
        }
    }

    /// The first of [`SESSION_END_SIGNALS`] received since installation.
    pub fn end_signal(&self) -> Option<libc::c_int> {
        match END_SIGNAL.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig),
        }
    }
}

impl Drop for SignalWatcher<'_> {
    fn drop(&mut self) {
        for (sig, previous) in self.previous.iter().rev() {
            // SAFETY: `previous` was filled by sigaction in install and
            // outlives the call.
            unsafe {
                libc::sigaction(*sig, previous, std::ptr::null_mut());
            }
        }
        // The handler is no longer installed; only after that may the pipe
        // it writes to be closed (when `self.write` drops).
        let _ = SIGNAL_PIPE.compare_exchange(
            self.write.as_raw_fd(),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
}

/// What the escape character starts, typed at the start of a line (first
/// thing in the session, or after Enter): `~.` disconnects.
pub const ESCAPE_HELP: &str = "~. (after Enter) disconnects, ~~ types a ~";

/// What [`EscapeScanner::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    /// Keep going; the bytes to send were appended.
    Continue,
    /// `~.` was typed: end the session from this side. Bytes after it are
    /// dropped.
    Disconnect,
}

/// The ssh-style escape on what a person types into a session: `~` at the
/// start of a line (first thing, or after Enter: CR or LF) is held back
/// until the next key. `~.` then disconnects, `~~` sends a single `~`, and
/// `~` followed by anything else sends both. A `~` elsewhere is ordinary.
#[derive(Debug, Clone)]
pub struct EscapeScanner {
    line_start: bool,
    tilde: bool,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl EscapeScanner {
    /// At the start of a line, nothing held back.
    pub fn new() -> Self {
        Self {
            line_start: true,
            tilde: false,
        }
    }

    /// Appends to `out` the bytes of `input` to send on.
    pub fn scan(&mut self, input: &[u8], out: &mut Vec<u8>) -> Scan {
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return Scan::Disconnect,
                    b'~' => {
                        out.push(b'~');
                        self.line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.line_start = matches!(b, b'\r' | b'\n');
        }
        Scan::Continue
    }

    /// At the end of the input: a `~` still held back goes out as typed.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.tilde) {
            out.push(b'~');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pty::Pty;

    #[test]
    fn raw_mode_is_restored_on_drop_and_on_panic() {
        let pty = Pty::open(WindowSize::default()).unwrap();
        let fd = pty.slave.as_fd();
        assert!(is_terminal(fd));
        let lflag = |fd: BorrowedFd<'_>| {
            // SAFETY: zeroed termios is valid; tcgetattr fills it.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: `t` outlives the call.
            assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
            t.c_lflag
        };
        let before = lflag(fd);
        assert_ne!(before & libc::ICANON, 0);
        {
            let _raw = RawMode::enable(fd).unwrap();
            assert_eq!(lflag(fd) & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
        }
        assert_eq!(lflag(fd), before);

        let unwound = std::panic::catch_unwind(|| {
            let _raw = RawMode::enable(fd).unwrap();
            panic!("boom");
        });
        assert!(unwound.is_err());
        assert_eq!(lflag(fd), before);

        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_terminal(a.as_fd()));
        assert!(RawMode::enable(a.as_fd()).is_err());
    }

    fn scan_all(pieces: &[&[u8]]) -> (Vec<u8>, Scan) {
        let mut esc = EscapeScanner::new();
        let mut out = Vec::new();
        for piece in pieces {
            if esc.scan(piece, &mut out) == Scan::Disconnect {
                return (out, Scan::Disconnect);
            }
        }
        esc.finish(&mut out);
        (out, Scan::Continue)
    }

    #[test]
    fn escape_at_the_start_of_a_line() {
        // First thing in the session, after CR (Enter in raw mode) or LF.
        assert_eq!(scan_all(&[b"~."]).1, Scan::Disconnect);
        let (out, scan) = scan_all(&[b"ls\r~.more"]);
        assert_eq!((out.as_slice(), scan), (&b"ls\r"[..], Scan::Disconnect));
        assert_eq!(scan_all(&[b"ls\n~."]).1, Scan::Disconnect);
        // Split across reads, as keys arrive one by one.
        assert_eq!(scan_all(&[b"ls\r", b"~", b"."]).1, Scan::Disconnect);
        // `~~` types one `~`, which does not start an escape again.
        assert_eq!(scan_all(&[b"~~."]), (b"~.".to_vec(), Scan::Continue));
        assert_eq!(
            scan_all(&[b"x\r~", b"~/bin\r"]),
            (b"x\r~/bin\r".to_vec(), Scan::Continue)
        );
        // `~` and anything else: both go out; after Enter the line starts again.
        assert_eq!(scan_all(&[b"~x"]), (b"~x".to_vec(), Scan::Continue));
        assert_eq!(scan_all(&[b"~\r~."]).1, Scan::Disconnect);
        // Not at the start of a line: ordinary characters.
        assert_eq!(
            scan_all(&[b"cd ~.; echo a~~b"]),
            (b"cd ~.; echo a~~b".to_vec(), Scan::Continue)
        );
        // A `~` held back when the input ends is sent as typed.
        assert_eq!(scan_all(&[b"ls\r~"]), (b"ls\r~".to_vec(), Scan::Continue));
    }

    #[test]
    fn only_pipes_and_files_count_as_input_given_on_purpose() {
        let (r, w) = {
            let mut fds = [-1; 2];
            // SAFETY: pipe2 writes two new descriptors into `fds`.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both descriptors are fresh and owned by nothing else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        assert!(is_pipe_or_file(r.as_fd()) && is_pipe_or_file(w.as_fd()));
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(is_pipe_or_file(file.as_fd()));
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(!is_pipe_or_file(null.as_fd()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!is_pipe_or_file(a.as_fd()));
        let pty = Pty::open(WindowSize::default()).unwrap();
        assert!(!is_pipe_or_file(pty.slave.as_fd()));
        let dir = std::fs::File::open("/").unwrap();
        assert!(!is_pipe_or_file(dir.as_fd()));
    }
}
