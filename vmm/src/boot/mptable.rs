//! The Intel MultiProcessor Specification (1.4) table: how a guest without ACPI finds its CPUs,
//! its IOAPIC and how ISA interrupts are wired.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{APIC_START, IOAPIC_START};
use crate::memory::GuestMemoryMmap;

/// Errors from writing the MP table.
#[derive(Debug, Error)]
pub enum MptableError {
    /// Too many vCPUs for the table's 8-bit APIC ids.
    #[error("too many vCPUs for an MP table: {0}")]
    TooManyCpus(u8),
    /// The table does not fit guest memory.
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ISA_IRQS: u8 = 16;
const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;
const PCI_SLOTS: u8 = 32;
/// Polarity active low (3), trigger level (3 << 2).
const PCI_IRQ_FLAGS: u16 = 0x0f;

/// Appends little-endian fields to a growing table.
#[derive(Default)]
struct TableWriter(Vec<u8>);

impl TableWriter {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// Makes the byte sum of `bytes` zero by setting the byte at `at`.
fn fix_checksum(bytes: &mut [u8], at: usize) {
    bytes[at] = 0;
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[at] = sum.wrapping_neg();
}

/// Builds the floating pointer structure followed by the configuration table, for a table placed
/// at guest-physical `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus >= 0xfe {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let table_base = base + 16;

    let mut entries = TableWriter::default();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries
            .u8(0) // processor entry
            .u8(cpu)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(0x600) // signature: family 6
            .u32(0x201) // features: FPU, APIC
            .u32(0)
            .u32(0);
        count += 1;
    }
    // Bus ids follow PCI numbering: PCI bus 0 is MP bus 0; ISA gets the next id.
    entries.u8(1).u8(PCI_BUS).bytes(b"PCI   ");
    entries.u8(1).u8(ISA_BUS).bytes(b"ISA   ");
    count += 2;
    entries
        .u8(2) // IOAPIC entry
        .u8(ioapic_id)
        .u8(IOAPIC_VERSION)
        .u8(1) // enabled
        .u32(IOAPIC_START as u32);
    count += 1;
    for irq in 0..ISA_IRQS {
        // ISA IRQ n goes to IOAPIC pin n (the timer's override to pin 2 is the guest's to make).
        entries
            .u8(3)
            .u8(0)
            .u16(0)
            .u8(ISA_BUS)
            .u8(irq)
            .u8(ioapic_id)
            .u8(irq);
        count += 1;
    }
    for slot in 1..PCI_SLOTS {
        // INTA# of each PCI slot: level triggered, active low, on IOAPIC pin 16 + slot % 8.
        let source = slot << 2;
        let pin = 16 + slot % 8;
        entries
            .u8(3)
            .u8(0)
            .u16(PCI_IRQ_FLAGS)
            .u8(PCI_BUS)
            .u8(source)
            .u8(ioapic_id)
            .u8(pin);
        count += 1;
    }
    // LINT0 = ExtINT (the PIC), LINT1 = NMI, on every local APIC.
    entries.u8(4).u8(3).u16(0).u8(0).u8(0).u8(0xff).u8(0);
    entries.u8(4).u8(1).u16(0).u8(0).u8(0).u8(0xff).u8(1);
    count += 2;

    let mut header = TableWriter::default();
    let table_len = 44 + entries.0.len();
    header
        .bytes(b"PCMP")
        .u16(table_len as u16)
        .u8(4) // spec revision 1.4
        .u8(0) // checksum, fixed below
        .bytes(b"FPHINT  ") // OEM id
        .bytes(b"FREEPAGE-VMM") // product id (12 bytes)
        .u32(0) // OEM table pointer
        .u16(0) // OEM table size
        .u16(count)
        .u32(APIC_START as u32)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0);
    let mut table = header.0;
    table.extend_from_slice(&entries.0);
    fix_checksum(&mut table, 7);

    let mut fp = TableWriter::default();
    fp.bytes(b"_MP_")
        .u32(table_base as u32)
        .u8(1) // length in 16-byte units
        .u8(4)
        .u8(0) // checksum
        .u8(0) // feature 1: a configuration table is present
        .u32(0);
    let mut out = fp.0;
    fix_checksum(&mut out, 10);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at `base`.
pub fn setup(mem: &GuestMemoryMmap, base: u64, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(base, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(base))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_layout() {
        for cpus in [1u8, 2, 8, 64] {
            let t = build(0xf0000, cpus).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0, "floating pointer checksum");
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(count as usize, cpus as usize + 2 + 1 + 16 + 31 + 2);
            // The first entry is the bootstrap processor.
            assert_eq!(table[44], 0);
            assert_eq!(table[44 + 3], CPU_ENABLED | CPU_BOOTSTRAP);
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert!(build(0xf0000, 0).is_err());
        assert!(build(0xf0000, 255).is_err());
    }
}
