//! The CPU model a vCPU sees: KVM's supported CPUID, with the topology
//! (APIC ids, core counts) made to match the VM and the hypervisor bit set.
//!
//! On kvm_pvm, KVM_SET_CPUID2 cannot hide host features from the guest; the
//! `pvm` guest profile hides them on the kernel command line instead.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_THERMAL: u32 = 0x6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_EPB: u32 = 1 << 3;

/// Adjusts `cpuid` for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: u8, count: u8) {
    let count32 = u32::from(count);
    for entry in cpuid.as_mut_slice().iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: APIC id [31:24], logical processors [23:16], CLFLUSH
                // line size in 8-byte units [15:8], brand index [7:0].
                entry.ebx =
                    (entry.ebx & 0xff) | (8 << 8) | (count32 << 16) | (u32::from(index) << 24);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE if entry.eax & 0x1f != 0 => {
                // One thread per core; the last-level cache is shared by all.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                entry.eax &= 0x3fff;
                entry.eax |= (sharing << 14) | ((count32 - 1) << 26);
            }
            LEAF_THERMAL => entry.ecx &= !ECX_EPB,
            LEAF_PMU => {
                // No virtual PMU.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = u32::from(index);
                match entry.index {
                    0 => {
                        // SMT level: one thread per core.
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | entry.index;
                    }
                    1 => {
                        // Core level: all vCPUs are cores of one package.
                        entry.eax = 32 - (count32.max(1) - 1).leading_zeros();
                        entry.ebx = count32;
                        entry.ecx = (2 << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x21, // cache leaf: level 1, type data
            ..Default::default()
        }
    }

    #[test]
    fn topology_matches_vcpu() {
        let mut cpuid =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(4, 0)]).unwrap();
        normalize(&mut cpuid, 3, 4);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
        assert_eq!(e[3].eax >> 26, 3);
    }
}
