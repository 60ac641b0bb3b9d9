//! The [`VirtioDevice`](super::VirtioDevice) plumbing that devices share:
//! feature negotiation, activation into an [`ActiveState`], reset, and
//! telling the event loop about both. virtio-blk and virtio-net embed a
//! [`DeviceCore`] and delegate to it (see `delegate_to_device_core!`),
//! keeping only their device-specific work in their own trait methods.
//! vsock keeps its queues and eventfds apart (it retires eventfds through a
//! graveyard on re-activation) and shares only [`Features`].

use std::sync::Arc;

use virtio_queue::QueueState;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, ActiveQueue, ActiveState, VirtioInterrupt};
use crate::GuestMemoryMmap;

/// The device now offers other features than the snapshot it is restored
/// from: the guest's driver negotiated against the old set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("device now offers features {now:#x}, the snapshot had {saved:#x}")]
pub struct FeaturesChanged {
    pub saved: u64,
    pub now: u64,
}

/// Feature bits a device offers and those the driver accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    avail: u64,
    acked: u64,
}

impl Features {
    /// Offers `avail`; nothing accepted yet.
    pub fn new(avail: u64) -> Self {
        Self { avail, acked: 0 }
    }

    /// Feature bits the device offers.
    pub fn avail(&self) -> u64 {
        self.avail
    }

    /// Feature bits the driver accepted.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Records the driver's accepted features; bits the device does not
    /// offer are dropped (the driver is not trusted).
    pub fn set_acked(&mut self, features: u64) {
        self.acked = features & self.avail;
    }

    /// Forgets the accepted features (driver reset).
    pub fn clear_acked(&mut self) {
        self.acked = 0;
    }

    /// Takes the negotiated features back from a snapshot, after checking
    /// that the device still offers what it offered then.
    pub fn restore(&mut self, saved_avail: u64, saved_acked: u64) -> Result<(), FeaturesChanged> {
        if self.avail != saved_avail {
            return Err(FeaturesChanged {
                saved: saved_avail,
                now: self.avail,
            });
        }
        self.set_acked(saved_acked);
        Ok(())
    }
}

/// Features, activation state and the eventfd that tells the event loop to
/// (de)register the queues of a device that runs with an [`ActiveState`].
///
/// Activation and reset happen on a vCPU thread (through the transport);
/// queue registrations can only change in the event loop, which listens on
/// [`DeviceCore::activate_evt`] and compares with [`DeviceCore::active`].
pub struct DeviceCore {
    pub features: Features,
    /// Signalled on activation and reset so the event loop re-registers.
    pub activate_evt: EventFd,
    /// What the device runs with; None until activated and after a reset.
    pub active: Option<ActiveState>,
}

impl DeviceCore {
    /// A device that offers `avail_features` and is not activated.
    pub fn new(avail_features: u64) -> std::io::Result<Self> {
        Ok(Self {
            features: Features::new(avail_features),
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
        })
    }

    /// Takes over the queues the transport hands over on DRIVER_OK, if there
    /// are `expected_queues` of them, and wakes the event loop to register
    /// them.
    pub fn activate(
        &mut self,
        expected_queues: usize,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != expected_queues {
            return Err(ActivateError::QueueCount {
                expected: expected_queues,
                got: queues.len(),
            });
        }
        self.activate_evt.write(1)?;
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queues,
        });
        Ok(())
    }

    /// Whether the device has been activated.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The state of the active queues; empty when not activated.
    pub fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map_or_else(Vec::new, ActiveState::queue_states)
    }

    /// Drops the active state and the accepted features (driver reset) and
    /// wakes the event loop to drop the registrations; `device` names the
    /// device in the log if that fails.
    pub fn reset(&mut self, device: &str) {
        self.active = None;
        self.features.clear_acked();
        if let Err(e) = self.activate_evt.write(1) {
            log::error!("{device}: failed to signal reset to the event loop: {e}");
        }
    }
}

/// The [`VirtioDevice`](super::VirtioDevice) methods of a device that keeps
/// its features and activation in a [`DeviceCore`] field, delegated to that
/// field: write `delegate_to_device_core!(field);` inside the device's
/// `impl VirtioDevice`. `activate` expects as many queues as
/// `queue_max_sizes` lists. `reset` stays with the device, which has its own
/// work to do there before calling [`DeviceCore::reset`].
macro_rules! delegate_to_device_core {
    ($core:ident) => {
        fn avail_features(&self) -> u64 {
            self.$core.features.avail()
        }

        fn acked_features(&self) -> u64 {
            self.$core.features.acked()
        }

        fn set_acked_features(&mut self, features: u64) {
            self.$core.features.set_acked(features);
        }

        fn activate(
            &mut self,
            mem: $crate::GuestMemoryMmap,
            interrupt: ::std::sync::Arc<$crate::virtio::VirtioInterrupt>,
            queues: ::std::vec::Vec<$crate::virtio::ActiveQueue>,
        ) -> ::std::result::Result<(), $crate::virtio::ActivateError> {
            let expected = self.queue_max_sizes().len();
            self.$core.activate(expected, mem, interrupt, queues)
        }

        fn is_activated(&self) -> bool {
            self.$core.is_activated()
        }

        fn queue_states(&self) -> ::std::vec::Vec<::virtio_queue::QueueState> {
            self.$core.queue_states()
        }
    };
}
pub(crate) use delegate_to_device_core;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{guest_memory, CountingInterrupt};
    use virtio_queue::{Queue, QueueT};

    fn queues(n: usize) -> Vec<ActiveQueue> {
        (0..n)
            .map(|_| ActiveQueue {
                queue: Queue::new(16).unwrap(),
                notify: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect()
    }

    fn interrupt() -> Arc<VirtioInterrupt> {
        Arc::new(VirtioInterrupt::new(Box::new(CountingInterrupt::default())))
    }

    #[test]
    fn features_mask_and_restore() {
        let mut f = Features::new(0b1010);
        f.set_acked(0b1111);
        assert_eq!(f.acked(), 0b1010);
        f.clear_acked();
        assert_eq!(f.acked(), 0);
        assert_eq!(
            f.restore(0b1000, 0b1000),
            Err(FeaturesChanged {
                saved: 0b1000,
                now: 0b1010
            })
        );
        assert_eq!(f.acked(), 0);
        f.restore(0b1010, 0b0111).unwrap();
        assert_eq!(f.acked(), 0b0010);
    }

    #[test]
    fn activate_checks_queue_count_and_signals() {
        let mem = guest_memory(0x10000);
        let mut core = DeviceCore::new(1).unwrap();
        assert!(matches!(
            core.activate(2, mem.clone(), interrupt(), queues(1)),
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        assert!(!core.is_activated());
        assert!(core.activate_evt.read().is_err(), "no wakeup on refusal");

        core.activate(2, mem, interrupt(), queues(2)).unwrap();
        assert!(core.is_activated());
        assert_eq!(core.queue_states().len(), 2);
        assert_eq!(core.activate_evt.read().unwrap(), 1);
    }

    #[test]
    fn reset_drops_state_and_features_and_signals() {
        let mut core = DeviceCore::new(0b11).unwrap();
        core.features.set_acked(0b01);
        core.activate(1, guest_memory(0x10000), interrupt(), queues(1))
            .unwrap();
        let _ = core.activate_evt.read();
        core.reset("test");
        assert!(!core.is_activated());
        assert!(core.queue_states().is_empty());
        assert_eq!(core.features.acked(), 0);
        assert_eq!(core.activate_evt.read().unwrap(), 1);
    }
}
