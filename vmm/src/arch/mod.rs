//! x86_64 specifics: the guest physical layout, how a kernel is loaded and
//! entered in 64-bit mode, and the per-vCPU CPU model.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod vcpu_state;
pub mod vm_state;
