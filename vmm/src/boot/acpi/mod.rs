//! ACPI tables for the guest, as Cloud Hypervisor gives them: a hardware-reduced platform
//! described by an RSDP, an XSDT, a FADT (with the power-off and reset registers), a MADT and
//! a DSDT (PCI host bridge, COM1, `\_S5`). There is no MCFG: the VMM has no ECAM, so guests
//! reach PCI configuration space through the conf1 ports.
//!
//! ```text
//! ACPI_START   RSDP ──▶ XSDT ──▶ FADT ──▶ DSDT
//!                            └──▶ MADT
//! ```
//! All of it lives in `ACPI_START..MPTABLE_START`, in the BIOS area that the memory map
//! reserves and that guests scan for the RSDP.

pub mod aml;
mod dsdt;
pub mod fadt;
mod madt;
mod root;
mod sdt;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

pub use self::dsdt::SLP_TYP_S5;
use crate::layout::{ACPI_SIZE, ACPI_START};
use crate::memory::GuestMemoryMmap;

/// Errors from building or writing the ACPI tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// Too many vCPUs for 8-bit APIC ids (the IOAPIC takes the id after the last vCPU).
    #[error("too many vCPUs for the ACPI tables: {0}")]
    TooManyCpus(u8),
    /// Encoding the DSDT failed.
    #[error("cannot encode the DSDT")]
    Aml(#[source] aml::AmlError),
    /// The tables do not fit the space the address map gives them.
    #[error("ACPI tables of {0} bytes do not fit their {ACPI_SIZE:#x}-byte area")]
    TooLarge(u64),
    /// Writing into guest memory failed.
    #[error("cannot write the ACPI tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..vcpus).
    pub vcpus: u8,
    /// The VM has a serial port at COM1.
    pub com1: bool,
}

/// Every table at its guest-physical address; the RSDP is the first.
#[derive(Debug)]
pub struct AcpiTables {
    /// (address, bytes) of each table.
    pub tables: Vec<(u64, Vec<u8>)>,
}

impl AcpiTables {
    /// Where the RSDP is.
    pub fn rsdp(&self) -> u64 {
        ACPI_START
    }
}

/// Places tables one after another, 16-byte aligned, after the RSDP.
struct Placer {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> u64 {
        let at = self.next;
        self.next = (at + bytes.len() as u64 + 15) & !15;
        self.tables.push((at, bytes));
        at
    }
}

/// Builds the tables for `config`, addressed for `ACPI_START`.
pub fn build(config: AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if config.vcpus == 0 || config.vcpus >= 0xfe {
        return Err(AcpiError::TooManyCpus(config.vcpus));
    }
    let mut p = Placer {
        next: ACPI_START + ((root::RSDP_LEN as u64 + 15) & !15),
        tables: Vec::new(),
    };
    let dsdt = dsdt::build(dsdt::DsdtConfig { com1: config.com1 }).map_err(AcpiError::Aml)?;
    let dsdt = p.place(dsdt);
    let fadt = p.place(fadt::build(dsdt));
    let madt = p.place(madt::build(config.vcpus));
    let xsdt = p.place(root::xsdt(&[fadt, madt]));
    let used = p.next - ACPI_START;
    if used > ACPI_SIZE {
        return Err(AcpiError::TooLarge(used));
    }
    let mut tables = vec![(ACPI_START, root::rsdp(xsdt))];
    tables.append(&mut p.tables);
    Ok(AcpiTables { tables })
}

/// Writes the tables for `config` into guest memory; returns the RSDP's address.
pub fn setup(mem: &GuestMemoryMmap, config: AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let tables = build(config)?;
    for (at, bytes) in &tables.tables {
        mem.write_slice(bytes, GuestAddress(*at))
            .map_err(AcpiError::Write)?;
    }
    Ok(GuestAddress(tables.rsdp()))
}

#[cfg(test)]
mod tests {
    use super::sdt::byte_sum;
    use super::*;
    use crate::layout::MPTABLE_START;

    fn u32_at(t: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
    }
    fn u64_at(t: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(t[at..at + 8].try_into().unwrap())
    }

    fn table_at(t: &AcpiTables, addr: u64) -> &[u8] {
        &t.tables
            .iter()
            .find(|(a, _)| *a == addr)
            .unwrap_or_else(|| panic!("no table at {addr:#x}"))
            .1
    }

    #[test]
    fn pointers_lead_from_the_rsdp_to_every_table() {
        let t = build(AcpiConfig {
            vcpus: 2,
            com1: true,
        })
        .unwrap();
        let rsdp = table_at(&t, t.rsdp());
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        let xsdt = table_at(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table_at(&t, a)[..4]).collect();
        assert_eq!(sigs, vec![&b"FACP"[..], b"APIC"]);
        let fadt = table_at(&t, entries[0]);
        let dsdt = table_at(&t, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_eq!(u64::from(u32_at(fadt, 40)), u64_at(fadt, 140));
        for (at, bytes) in &t.tables[1..] {
            assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "length at {at:#x}");
            assert_eq!(byte_sum(bytes), 0, "checksum at {at:#x}");
        }
    }

    #[test]
    fn tables_stay_in_their_area_and_do_not_overlap() {
        for vcpus in [1u8, 2, 254 - 1] {
            let t = build(AcpiConfig { vcpus, com1: true }).unwrap();
            let mut spans: Vec<(u64, u64)> = t
                .tables
                .iter()
                .map(|(a, b)| (*a, *a + b.len() as u64))
                .collect();
            spans.sort();
            assert_eq!(spans[0].0, ACPI_START);
            assert_eq!(spans[0].0 % 16, 0, "RSDP on a 16-byte boundary");
            for w in spans.windows(2) {
                assert!(w[0].1 <= w[1].0, "{w:?} overlap");
            }
            assert!(spans.last().unwrap().1 <= MPTABLE_START);
        }
    }

    #[test]
    fn madt_counts_the_vcpus() {
        for vcpus in [1u8, 2, 4] {
            let t = build(AcpiConfig { vcpus, com1: false }).unwrap();
            let madt = &t.tables.iter().find(|(_, b)| &b[..4] == b"APIC").unwrap().1;
            let mut p = 44;
            let mut lapics = 0;
            while p < madt.len() {
                if madt[p] == 0 && madt[p + 4] & 1 == 1 {
                    lapics += 1;
                }
                p += usize::from(madt[p + 1]);
            }
            assert_eq!(lapics, vcpus);
        }
    }

    #[test]
    fn impossible_cpu_counts_are_refused() {
        for vcpus in [0u8, 254, 255] {
            assert!(matches!(
                build(AcpiConfig { vcpus, com1: false }),
                Err(AcpiError::TooManyCpus(_))
            ));
        }
    }
}
