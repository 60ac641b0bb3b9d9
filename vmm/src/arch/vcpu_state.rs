//! Saving and restoring one vCPU's architectural state through KVM.
//!
//! The order of the ioctls matters and follows KVM's dependencies: CPUID
//! before MSRs (KVM validates MSRs against the CPU model), special registers
//! before the local APIC, events last.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency, when KVM reports one.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// A vCPU state operation that failed, naming the ioctl.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StateError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

/// Reads the MSRs in `indices` that this vCPU can read. KVM stops at the
/// first MSR it cannot read; that one is skipped and the rest retried, so
/// one unsupported MSR does not lose all the others.
pub fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            what: "KVM_GET_MSRS (building the list)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the MSR KVM refused, if any.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Captures the state of a paused vCPU. `msr_indices` is the list of MSRs
/// to save (KVM_GET_MSR_INDEX_LIST).
pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok().filter(|&k| k > 0);
    Ok(VcpuState {
        cpuid,
        msrs,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        vcpu_events,
        tsc_khz,
    })
}

/// Loads `state` into a freshly created vCPU.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError {
        what: "KVM_SET_CPUID2 (too many entries)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        // Keep the guest's TSC rate when the host's differs (TSC scaling);
        // a host without scaling at the same rate accepts this as a no-op.
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(err("KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
    // SAFETY: `state.xsave` is a complete kvm_xsave as KVM_GET_XSAVE
    // returned it (the legacy 4 KiB layout this VMM saves).
    unsafe { fd.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debug_regs)
        .map_err(err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| StateError {
        what: "KVM_SET_MSRS (too many entries)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
    if set != state.msrs.len() {
        return Err(StateError {
            what: "KVM_SET_MSRS (refused an MSR)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}
