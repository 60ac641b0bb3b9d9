//! The Intel MultiProcessor Specification (1.4) table that tells a guest
//! without ACPI how many CPUs it has and how ISA interrupts reach the IOAPIC.
//!
//! Layout at [`EBDA_START`]: floating pointer (16 bytes), configuration table
//! header (44 bytes), then entries: one processor per vCPU, the ISA bus, the
//! IOAPIC, one I/O interrupt per IOAPIC pin, and the two local interrupts.

use devices::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_BASE, EBDA_START, IOAPIC_BASE, IRQ_MAX};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6, with an FPU and an on-chip APIC.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Most vCPUs an MP table can describe before its IOAPIC id (which follows
/// the APIC ids) leaves the 8-bit range.
pub const MAX_VCPUS: u8 = 254;

/// Why the table could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit an MP table (1..={MAX_VCPUS})")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory: {0}")]
    GuestWrite(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table for `num_cpus` vCPUs as it will sit at `base`.
fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    for cpu in 0..num_cpus {
        entries.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 });
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_BASE.to_le_bytes());
    for pin in 0..=IRQ_MAX as u8 {
        // type, interrupt type, flags (u16: bus defaults), bus, bus irq, ioapic, pin
        entries.extend([
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
    }
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = num_cpus as u16 + 1 + 1 + (IRQ_MAX as u16 + 1) + 2;

    let header_len = 44usize;
    let table_len = (header_len + entries.len()) as u16;
    let mut table = Vec::with_capacity(table_len as usize);
    table.extend(b"PCMP");
    table.extend(table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend(b"VMM     "); // OEM id
    table.extend(b"MICROVM     "); // product id
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(entry_count.to_le_bytes());
    table.extend(APIC_BASE.to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.extend([0u8, 0u8]); // extended checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend(b"_MP_");
    fp.extend(((base + 16) as u32).to_le_bytes());
    fp.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length 1 (16 bytes), rev 1.4, checksum, features
    fp[10] = checksum(&fp);

    fp.extend(table);
    fp
}

/// Writes the MP table for `num_cpus` vCPUs at [`EBDA_START`].
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    mem.write_slice(&build(num_cpus, EBDA_START), GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts_are_right() {
        for cpus in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(cpus, EBDA_START);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 24 + 2);
            // Processor entries are 20 bytes, all others 8.
            assert_eq!(len, 44 + 20 * cpus as usize + 8 * (2 + 24 + 2));
            // The floating pointer points at the table.
            assert_eq!(
                u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64,
                EBDA_START + 16
            );
        }
    }

    #[test]
    fn stays_out_of_e820_ram_and_rejects_bad_counts() {
        // [EBDA_START, HIMEM_START) is not RAM in the e820 map, so the guest
        // never reuses the table's memory.
        let end = EBDA_START as usize + build(MAX_VCPUS, EBDA_START).len();
        assert!(end <= super::super::layout::HIMEM_START as usize);
        let mem = crate::memory::create_anonymous(16).unwrap();
        assert!(matches!(
            setup_mptable(&mem, 0),
            Err(MptableError::TooManyCpus(0))
        ));
        assert!(matches!(
            setup_mptable(&mem, 255),
            Err(MptableError::TooManyCpus(255))
        ));
        setup_mptable(&mem, 2).unwrap();
    }
}
