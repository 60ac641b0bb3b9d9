//! Ctrl-C handling. Each VM the vmm library builds installs its own
//! SIGINT/SIGTERM handler (which only asks that VM to stop); the harness
//! puts its own back after every build so an interrupt ends the whole run,
//! with temp files removed and guests shut down.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs (again) the harness's SIGINT and SIGTERM handler.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Whether the user asked the harness to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with [`crate::error::BenchError::Interrupted`] once interrupted.
pub fn check() -> crate::error::Result<()> {
    if interrupted() {
        Err(crate::error::BenchError::Interrupted)
    } else {
        Ok(())
    }
}
