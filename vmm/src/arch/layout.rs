//! The guest physical address map. One place, so boot code, device placement
//! and snapshots agree on it.

/// Zero page (Linux `boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot GDT and IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Identity-mapping page tables for the first GiB (2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux 6.x accepts 2048 bytes on x86 (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table lives; RAM
/// below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and high memory start.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: devices live here, RAM does not.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each, inside the MMIO gap.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC pins available to virtio devices (COM1 has 4; 0-4 are legacy).
pub const IRQ_FIRST_VIRTIO: u32 = 5;
pub const IRQ_MAX: u32 = 23;
/// KVM needs three pages for the TSS just below the IOAPIC/BIOS area.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Local APIC and IOAPIC base addresses (architectural defaults).
pub const APIC_BASE: u32 = 0xfee0_0000;
pub const IOAPIC_BASE: u32 = 0xfec0_0000;

/// Guest RAM ranges for `mem_size` bytes of memory: below the MMIO gap
/// first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
