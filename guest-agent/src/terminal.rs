//! The host's own terminal during an interactive session: raw mode (so every
//! key, Ctrl-C included, goes to the guest instead of being handled here) and
//! window-size changes (SIGWINCH) turned into something `poll` can wait for.
//!
//! Both are guards: dropping them restores the terminal settings and the
//! previous SIGWINCH disposition, which also happens while a panic unwinds.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::proto::WindowSize;
use crate::sys::{self, cvt};

/// Whether `fd` is a terminal.
pub fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd.as_raw_fd()) == 1 }
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
            eprintln!(
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

/// Write end of the pipe the SIGWINCH handler signals; -1 when none is
/// installed. Only one watcher may exist at a time (the handler is global).
static WINCH_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_winch(_: libc::c_int) {
    let fd = WINCH_PIPE.load(Ordering::Relaxed);
    if fd < 0 {
        return;
    }
    // SAFETY: __errno_location returns this thread's errno slot; saving and
    // restoring it keeps the interrupted code's errno intact. write(2) is
    // async-signal-safe; the byte lives on this stack frame. A full pipe
    // (EAGAIN) already holds a pending notification.
    unsafe {
        let errno = *libc::__errno_location();
        let byte = 1u8;
        libc::write(fd, (&byte as *const u8).cast(), 1);
        *libc::__errno_location() = errno;
    }
}

/// Turns SIGWINCH into readability of [`WinchWatcher::fd`] and reports the
/// new size of terminal `tty`. The previous handler is restored on drop.
pub struct WinchWatcher<'a> {
    tty: BorrowedFd<'a>,
    read: OwnedFd,
    write: OwnedFd,
    previous: libc::sigaction,
}

impl<'a> WinchWatcher<'a> {
    /// Installs the handler; fails if another watcher is installed.
    pub fn install(tty: BorrowedFd<'a>) -> io::Result<Self> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`.
        cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) })?;
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if WINCH_PIPE
            .compare_exchange(-1, write.as_raw_fd(), Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a window-size watcher is already installed",
            ));
        }
        // SAFETY: sigaction is plain old data; all-zero is a valid value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_winch as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: as above.
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both structs outlive the call; the handler only does
        // async-signal-safe work (an atomic load and write(2)).
        let rc = unsafe { libc::sigaction(libc::SIGWINCH, &action, &mut previous) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            WINCH_PIPE.store(-1, Ordering::SeqCst);
            return Err(e);
        }
        Ok(Self {
            tty,
            read,
            write,
            previous,
        })
    }

    /// Readable after a SIGWINCH; poll it, then call [`Self::take`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }

    /// Consumes the notifications and returns the terminal's current size.
    pub fn take(&self) -> Option<WindowSize> {
        let mut buf = [0u8; 64];
        while matches!(sys::read(self.read.as_fd(), &mut buf), Ok(n) if n > 0) {}
        sys::window_size(self.tty)
    }
}

impl Drop for WinchWatcher<'_> {
    fn drop(&mut self) {
        // SAFETY: `previous` was filled by sigaction in install and outlives the call.
        unsafe {
            libc::sigaction(libc::SIGWINCH, &self.previous, std::ptr::null_mut());
        }
        // The handler is no longer installed; only after that may the pipe
        // it writes to be closed (when `self.write` drops).
        let _ = WINCH_PIPE.compare_exchange(
            self.write.as_raw_fd(),
            -1,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
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
}
