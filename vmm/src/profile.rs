//! Guest profiles: what the kernel command line needs on a given kind of KVM
//! host. Everything host-specific about running a guest lives here.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the kernel module of the paravirtual, pagetable-based KVM appears.
const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// The kind of host KVM the guest runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestProfile {
    /// Ordinary hardware KVM (Intel VMX / AMD SVM).
    Standard,
    /// `kvm_pvm`: guest kernel mode is emulated, and the emulator lacks some
    /// instructions and cannot hide CPUID features, so the kernel must be
    /// told not to use them.
    Pvm,
}

impl GuestProfile {
    /// The profile of this host.
    pub fn detect() -> Self {
        if Path::new(KVM_PVM_MODULE).exists() {
            GuestProfile::Pvm
        } else {
            GuestProfile::Standard
        }
    }

    /// Kernel command-line arguments this profile always needs.
    pub fn required_cmdline(self) -> &'static str {
        match self {
            GuestProfile::Standard => "",
            // No XSAVE (xrstor in FPU init cannot be emulated), and no
            // instructions the CPL0 emulator lacks. Clearing `hypervisor`
            // keeps the kernel off KVM paravirt paths that use vmcall.
            GuestProfile::Pvm => {
                "noxsave clearcpuid=popcnt,rdtscp,rdpid,pku,smap,erms,fsrm,hypervisor"
            }
        }
    }
}

/// The command line a guest gets when the user gives none.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_follows_the_module() {
        let expected = if Path::new(KVM_PVM_MODULE).exists() {
            GuestProfile::Pvm
        } else {
            GuestProfile::Standard
        };
        assert_eq!(GuestProfile::detect(), expected);
        assert!(GuestProfile::Pvm.required_cmdline().contains("noxsave"));
        assert_eq!(GuestProfile::Standard.required_cmdline(), "");
    }
}
