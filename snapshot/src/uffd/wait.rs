//! The one wait both userfaultfd threads do (the page server and the live
//! snapshot's write tracker): for events on the userfaultfd or their stop
//! signal.

use std::io;
use std::os::fd::AsRawFd;

use userfaultfd::Uffd;
use vmm_sys_util::eventfd::EventFd;

/// What [`wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ready {
    /// Events are queued on the userfaultfd.
    pub events: bool,
    /// The userfaultfd reports an error condition (POLLERR/HUP/NVAL).
    pub broken: bool,
    /// The stop eventfd was signalled.
    pub stop: bool,
}

/// Waits until `uffd` has events or `stop` is signalled, or `timeout_ms`
/// passes (-1: no limit). A signal interrupting the wait restarts it.
pub(crate) fn wait(uffd: &Uffd, stop: &EventFd, timeout_ms: i32) -> io::Result<Ready> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        return Ok(Ready {
            events: fds[0].revents & libc::POLLIN != 0,
            broken: fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0,
            stop: fds[1].revents & libc::POLLIN != 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_the_stop_signal_and_times_out_without_it() {
        let uffd = userfaultfd::UffdBuilder::new()
            .non_blocking(true)
            .create()
            .expect("userfaultfd (vm.unprivileged_userfaultfd or root needed)");
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let idle = wait(&uffd, &stop, 10).unwrap();
        assert_eq!(
            idle,
            Ready {
                events: false,
                broken: false,
                stop: false
            }
        );
        stop.write(1).unwrap();
        assert!(wait(&uffd, &stop, -1).unwrap().stop);
    }
}
