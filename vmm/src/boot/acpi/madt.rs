//! The Multiple APIC Description Table (ACPI 6.5 section 5.2.12): one local APIC per vCPU,
//! the IOAPIC, and how ISA interrupts reach it. The wiring is the one the VMM installs
//! (`crate::interrupts`: GSI n to IOAPIC pin n) and the MP table describes: ISA IRQ n is
//! GSI n, edge-triggered and active high; every local APIC has NMI on LINT1.

use super::sdt::{table, Writer};
use crate::layout::{APIC_START, IOAPIC_START};

/// MADT revision (ACPI 6.3 and later).
const REVISION: u8 = 5;
/// Flags: the platform also has dual 8259 PICs (KVM's in-kernel PIC), which the OS must mask.
const PCAT_COMPAT: u32 = 1;

const TYPE_LOCAL_APIC: u8 = 0;
const TYPE_IO_APIC: u8 = 1;
const TYPE_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const TYPE_LOCAL_APIC_NMI: u8 = 4;
const LOCAL_APIC_ENABLED: u32 = 1;
const ISA_BUS: u8 = 0;
/// MPS INTI flags 0: polarity and trigger mode conform to the bus (ISA: active high, edge).
const CONFORMS_TO_BUS: u16 = 0;
/// The ISA IRQs the guest can be told about; IRQ 2 is the PIC cascade and has no device.
const ISA_IRQS: [u8; 15] = [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
/// All processors, in a local APIC NMI entry.
const ALL_PROCESSORS: u8 = 0xff;
const LINT1: u8 = 1;

/// The IOAPIC id: the first id after the vCPUs' APIC ids, as in the MP table.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the MADT for `num_cpus` vCPUs with APIC ids (and ACPI processor UIDs) 0..num_cpus.
pub fn build(num_cpus: u8) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(APIC_START as u32).u32(PCAT_COMPAT);
    for cpu in 0..num_cpus {
        w.u8(TYPE_LOCAL_APIC)
            .u8(8)
            .u8(cpu) // ACPI processor UID
            .u8(cpu) // APIC id
            .u32(LOCAL_APIC_ENABLED);
    }
    w.u8(TYPE_IO_APIC)
        .u8(12)
        .u8(ioapic_id(num_cpus))
        .u8(0)
        .u32(IOAPIC_START as u32)
        .u32(0); // GSI base: pins 0-23 are GSIs 0-23
    for irq in ISA_IRQS {
        w.u8(TYPE_INTERRUPT_SOURCE_OVERRIDE)
            .u8(10)
            .u8(ISA_BUS)
            .u8(irq)
            .u32(u32::from(irq))
            .u16(CONFORMS_TO_BUS);
    }
    w.u8(TYPE_LOCAL_APIC_NMI)
        .u8(6)
        .u8(ALL_PROCESSORS)
        .u16(CONFORMS_TO_BUS)
        .u8(LINT1);
    table(b"APIC", REVISION, b"FPVMMADT", &w.0)
}

#[cfg(test)]
mod tests {
    use super::super::sdt::{byte_sum, HEADER_LEN};
    use super::*;

    /// (type, bytes) of every entry after the fixed fields.
    fn entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut p = HEADER_LEN + 8;
        while p < t.len() {
            let len = usize::from(t[p + 1]);
            assert!(len >= 2 && p + len <= t.len(), "entry at {p} overruns");
            out.push((t[p], t[p..p + len].to_vec()));
            p += len;
        }
        out
    }

    #[test]
    fn one_local_apic_per_vcpu() {
        for cpus in [1u8, 2, 4, 64, 254] {
            let t = build(cpus);
            assert_eq!(&t[0..4], b"APIC");
            assert_eq!(byte_sum(&t), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().unwrap()),
                APIC_START as u32
            );
            let e = entries(&t);
            let lapics: Vec<_> = e.iter().filter(|(ty, _)| *ty == TYPE_LOCAL_APIC).collect();
            assert_eq!(lapics.len(), usize::from(cpus));
            for (i, (_, b)) in lapics.iter().enumerate() {
                assert_eq!(b[2] as usize, i, "processor UID");
                assert_eq!(b[3] as usize, i, "APIC id");
                assert_eq!(b[4] & 1, 1, "enabled");
            }
            let expected_len =
                HEADER_LEN + 8 + 8 * usize::from(cpus) + 12 + 10 * ISA_IRQS.len() + 6;
            assert_eq!(t.len(), expected_len);
        }
    }

    #[test]
    fn ioapic_and_isa_wiring_match_the_vmm() {
        let t = build(2);
        let e = entries(&t);
        let ioapics: Vec<_> = e.iter().filter(|(ty, _)| *ty == TYPE_IO_APIC).collect();
        assert_eq!(ioapics.len(), 1);
        let io = &ioapics[0].1;
        assert_eq!(io[2], 2, "IOAPIC id after the vCPUs, as in the MP table");
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()),
            IOAPIC_START as u32
        );
        assert_eq!(u32::from_le_bytes(io[8..12].try_into().unwrap()), 0);
        let overrides: Vec<_> = e
            .iter()
            .filter(|(ty, _)| *ty == TYPE_INTERRUPT_SOURCE_OVERRIDE)
            .map(|(_, b)| (b[3], u32::from_le_bytes(b[4..8].try_into().unwrap()), b[8]))
            .collect();
        // COM1's IRQ 4 must reach pin 4, where the VMM's irqfd raises it.
        assert!(overrides.contains(&(4, 4, 0)));
        assert!(overrides
            .iter()
            .all(|&(irq, gsi, _)| u32::from(irq) == gsi && irq != 2));
        let nmi: Vec<_> = e
            .iter()
            .filter(|(ty, _)| *ty == TYPE_LOCAL_APIC_NMI)
            .collect();
        assert_eq!(nmi.len(), 1);
        assert_eq!(nmi[0].1[2], ALL_PROCESSORS);
        assert_eq!(nmi[0].1[5], LINT1);
    }
}
