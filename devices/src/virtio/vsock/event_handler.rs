//! The device in the VMM's event loop: queue notifications, the host
//! listener and host streams, with epoll interest kept in step with what
//! each connection can use (see `Connection::wanted_events`).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVENT_QUEUE};

impl Vsock {
    /// Registers the queue eventfds and the listener once the device is
    /// active, and deregisters eventfds left over from a reset.
    fn register_active(&mut self, ops: &mut EventOps) {
        for evt in self.evt_graveyard.drain(..) {
            let fd = evt.as_raw_fd();
            if let Some(pos) = self.registered_evts.iter().position(|&r| r == fd) {
                self.registered_evts.swap_remove(pos);
                if let Err(e) = ops.remove(Events::empty(&evt)) {
                    log::warn!("vsock: cannot deregister queue eventfd {fd}: {e:?}");
                }
            }
        }
        let Some(active) = self.active.as_ref() else {
            return;
        };
        for evt in &active.evts {
            let fd = evt.as_raw_fd();
            if self.registered_evts.contains(&fd) {
                continue;
            }
            match ops.add(Events::new(evt, EventSet::IN)) {
                Ok(()) => self.registered_evts.push(fd),
                Err(e) => log::error!("vsock: cannot register queue eventfd {fd}: {e:?}"),
            }
        }
        if !self.listener_registered {
            let fd = self.muxer.listener_fd();
            match ops.add(Events::new_raw(fd, EventSet::IN)) {
                Ok(()) => self.listener_registered = true,
                Err(e) => log::error!("vsock: cannot register the host listener: {e:?}"),
            }
        }
    }

    /// Applies the muxer's epoll changes: closes reaped streams after
    /// removing them from the set, and updates interest of touched ones.
    fn sync_epoll(&mut self, ops: &mut EventOps) {
        for stream in self.muxer.take_graveyard() {
            let fd = stream.as_raw_fd();
            if self.host_interest.remove(&fd).is_some() {
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    log::warn!("vsock: cannot deregister host fd {fd}: {e:?}");
                }
            }
        }
        for (fd, wanted) in self.muxer.take_touched() {
            let Some(wanted) = wanted else {
                continue;
            };
            let current = self.host_interest.get(&fd).copied();
            let res = match current {
                Some(cur) if cur == wanted => continue,
                Some(_) if wanted.is_empty() => {
                    self.host_interest.remove(&fd);
                    ops.remove(Events::empty_raw(fd))
                }
                Some(_) => {
                    self.host_interest.insert(fd, wanted);
                    ops.modify(Events::new_raw(fd, wanted))
                }
                None if wanted.is_empty() => continue,
                None => {
                    self.host_interest.insert(fd, wanted);
                    ops.add(Events::new_raw(fd, wanted))
                }
            };
            if let Err(e) = res {
                log::error!("vsock: epoll update for host fd {fd} to {wanted:?} failed: {e:?}");
            }
        }
    }

    /// Work the loop does after activation, restore or a kick.
    fn on_kick(&mut self, ops: &mut EventOps) {
        self.register_active(ops);
        self.try_send_reset_event();
        self.process_queues();
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick_evt, EventSet::IN)) {
            log::error!("vsock: cannot register the kick eventfd: {e:?}");
        }
        // A restored device is active before it joins the loop.
        self.on_kick(ops);
        self.sync_epoll(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.kick_evt.as_raw_fd() {
            let _ = self.kick_evt.read();
            self.on_kick(ops);
        } else if let Some(idx) = self
            .active
            .as_ref()
            .and_then(|a| a.evts.iter().position(|e| e.as_raw_fd() == fd))
        {
            if let Some(evt) = self.active.as_ref().map(|a| &a.evts[idx]) {
                let _ = evt.read();
            }
            if idx == EVENT_QUEUE {
                self.try_send_reset_event();
            } else {
                self.process_queues();
            }
        } else if fd == self.muxer.listener_fd() {
            self.muxer.on_listener_readable(self.active.is_some());
            self.process_queues();
        } else if self.registered_evts.contains(&fd) {
            // A queue eventfd from before a reset: deregister it now.
            self.register_active(ops);
        } else {
            self.muxer.on_host_event(fd, events.event_set());
            self.process_queues();
        }
        self.sync_epoll(ops);
    }
}
