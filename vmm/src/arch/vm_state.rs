//! Saving and restoring the VM-wide in-kernel devices: the two PICs, the
//! IOAPIC, the PIT and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::vcpu_state::StateError;

/// The VM's in-kernel device state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock_ns", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(err(what))?;
    Ok(chip)
}

/// Captures the VM state; vCPUs must be paused.
pub fn save(fd: &VmFd) -> Result<VmState, StateError> {
    let mut clock = fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
    // Only the clock value is restored; flags describing the source host
    // (TSC stability, realtime) mean nothing on the target.
    clock.flags = 0;
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Loads `state` into a VM whose irqchip and PIT exist.
pub fn restore(fd: &VmFd, state: &VmState) -> Result<(), StateError> {
    fd.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
    fd.set_irqchip(&state.pic_master)
        .map_err(err("KVM_SET_IRQCHIP (PIC master)"))?;
    fd.set_irqchip(&state.pic_slave)
        .map_err(err("KVM_SET_IRQCHIP (PIC slave)"))?;
    fd.set_irqchip(&state.ioapic)
        .map_err(err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}
