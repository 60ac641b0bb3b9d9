//! Interrupt delivery from devices to the guest, independent of KVM.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line a device can raise.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt (edge).
    fn trigger(&self) -> io::Result<()>;
}

/// An interrupt backed by an eventfd that the VMM registered with KVM as an
/// irqfd for one GSI: writing the eventfd injects the interrupt in-kernel,
/// without a trip through the VMM.
pub struct IrqFd {
    evt: EventFd,
}

impl IrqFd {
    /// Wraps an eventfd already registered as an irqfd.
    pub fn new(evt: EventFd) -> Self {
        Self { evt }
    }

    /// The eventfd, for registration with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Interrupt for IrqFd {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}
