//! virtio-net in the event loop: activation/reset, queue notifications and
//! TAP readiness.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{RX_QUEUE, TX_QUEUE};
use super::Net;

/// Event data of the activation eventfd.
const ACTIVATE: u32 = u32::MAX;
/// Event data of the TAP fd; queue notifications use the queue index.
const TAP: u32 = 0x100;
const RX: u32 = RX_QUEUE as u32;
const TX: u32 = TX_QUEUE as u32;

impl Net {
    fn set_tap_polling(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.tap_registered {
            return;
        }
        let result = if on {
            ops.add(Events::with_data(&self.tap, TAP, EventSet::IN))
        } else {
            ops.remove(Events::with_data(&self.tap, TAP, EventSet::IN))
        };
        match result {
            Ok(()) => self.tap_registered = on,
            Err(e) => log::error!(
                "virtio-net: failed to {} TAP {}: {e:?}",
                if on { "poll" } else { "stop polling" },
                self.tap.name()
            ),
        }
    }

    fn rx(&mut self, ops: &mut EventOps) {
        let have_buffers = self.process_rx();
        self.set_tap_polling(ops, have_buffers && self.core.is_activated());
    }

    fn tx(&mut self) {
        if !self.process_tx() {
            // Budget spent with chains left: come back after the others.
            self.registrations.kick(TX_QUEUE);
        }
    }

    /// Brings registrations in line with the activation state after an
    /// activation or reset on a vCPU thread.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        self.registrations.clear(ops);
        self.set_tap_polling(ops, false);
        let Some(active) = &self.core.active else {
            return;
        };
        if let Err(e) = self.registrations.register(ops, &active.queues, 0) {
            log::error!("virtio-net: failed to register queue eventfds: {e}");
            return;
        }
        // Buffers may have been posted before registration (or before a
        // snapshot was taken): serve them now.
        self.tx();
        self.rx(ops);
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.core.activate_evt,
            ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-net: failed to register activation eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                let _ = self.core.activate_evt.read();
                self.sync_registrations(ops);
            }
            RX => {
                if self.registrations.ack(RX_QUEUE) {
                    self.rx(ops);
                }
            }
            TX => {
                if self.registrations.ack(TX_QUEUE) {
                    self.tx();
                }
            }
            TAP => self.rx(ops),
            other => log::warn!("virtio-net: unexpected event data {other}"),
        }
    }
}
