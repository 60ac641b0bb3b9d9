//! virtio-blk in the event loop: activation/reset and queue notifications.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;

/// Event data of the activation eventfd; queue notifications use the queue
/// index (0).
const ACTIVATE: u32 = u32::MAX;

impl Block {
    /// Brings the event registrations in line with the activation state
    /// after an activation or reset on a vCPU thread.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        self.registrations.clear(ops);
        let Some(active) = &self.core.active else {
            return;
        };
        if let Err(e) = self.registrations.register(ops, &active.queues, 0) {
            log::error!("virtio-blk: failed to register queue eventfd: {e}");
            return;
        }
        // Requests may have been posted before registration (or before a
        // snapshot was taken): serve them now.
        self.process_queue();
    }
}

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.core.activate_evt,
            ACTIVATE,
            EventSet::IN,
        )) {
            log::error!("virtio-blk: failed to register activation eventfd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            ACTIVATE => {
                let _ = self.core.activate_evt.read();
                self.sync_registrations(ops);
            }
            0 => {
                if self.registrations.ack(0) {
                    self.process_queue();
                }
            }
            other => log::warn!("virtio-blk: unexpected event data {other}"),
        }
    }
}
