//! The Differentiated System Description Table: the `\_S5` sleep type the power-off register
//! expects, the PCI host bridge (bus 0 behind the conf1 ports, its windows and the INTx
//! routing of its slots) and the COM1 serial port.
//!
//! ```text
//! Name (\_S5, Package () { 5, 5, 0, 0 })
//! Scope (\_SB) {
//!     Device (PCI0) { _HID PNP0A08, _CID PNP0A03, _UID 0, _SEG 0, _BBN 0,
//!                     _CRS { bus 0, I/O 0xCF8-0xCFF, I/O window, 32-bit MMIO window },
//!                     _PRT { slot n INTA -> GSI 16 + n % 8, n = 1..31 } }
//!     Device (COM1) { _HID PNP0501, _UID 0, _CRS { I/O 0x3F8-0x3FF, IRQ 4 } }
//! }
//! ```

use super::aml::{self, resource, AmlError};
use super::sdt::table;
use crate::devices::balloon::intx_gsi;
use crate::devices::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::layout::{PCI_IO_WINDOW_END, PCI_IO_WINDOW_START};

/// DSDT revision 2: integers are 64 bits wide.
const REVISION: u8 = 2;
/// The SLP_TYP value of S5 (soft off) that the sleep control register acts on.
pub const SLP_TYP_S5: u8 = 5;
/// The only PCI bus.
const PCI_BUS: u8 = 0;
/// `_PRT` pin number of INTA#.
const PIN_INTA: u64 = 0;

/// What the DSDT describes besides the PCI host bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsdtConfig {
    /// The VM has a serial port at COM1.
    pub com1: bool,
}

/// The BAR window the VMM's allocator hands out, and the conf1 ports: all fit the 32-bit
/// and 16-bit descriptors that describe them.
const MMIO_WINDOW_START: u32 = virtio_devices::MMIO32_WINDOW_START as u32;
const MMIO_WINDOW_END: u32 =
    (virtio_devices::MMIO32_WINDOW_START + virtio_devices::MMIO32_WINDOW_SIZE - 1) as u32;
const _: () =
    assert!(virtio_devices::MMIO32_WINDOW_START + virtio_devices::MMIO32_WINDOW_SIZE <= 1 << 32);
const CONF1_LEN: u8 = virtio_devices::PCI_CONFIG_IO_PORT_SIZE as u8;
const _: () = assert!(virtio_devices::PCI_CONFIG_IO_PORT_SIZE <= 0xff);
/// COM1's ports and ISA interrupt, as the serial device is wired.
const COM1_PORT: u16 = COM1_BASE as u16;
const COM1_PORTS: u8 = COM1_LEN as u8;
const COM1_ISA_IRQ: u8 = COM1_IRQ as u8;
const _: () = assert!(COM1_BASE + COM1_LEN <= 0x1_0000 && COM1_LEN <= 0xff && COM1_IRQ < 16);

fn pci_host_bridge() -> Result<Vec<u8>, AmlError> {
    let crs = resource::template(&[
        resource::word_bus_number(PCI_BUS, PCI_BUS),
        resource::io_port(virtio_devices::PCI_CONFIG_IO_PORT, CONF1_LEN),
        resource::word_io(PCI_IO_WINDOW_START, PCI_IO_WINDOW_END),
        resource::dword_memory(MMIO_WINDOW_START, MMIO_WINDOW_END),
    ])?;
    let mut routes = Vec::new();
    // Slot 0 is the host bridge, which has no interrupt.
    for slot in 1..virtio_devices::pci::NUM_SLOTS {
        routes.push(aml::package(&[
            aml::integer((u64::from(slot) << 16) | 0xffff), // all functions of the slot
            aml::integer(PIN_INTA),
            aml::integer(0), // source 0: the last field is a GSI
            aml::integer(u64::from(intx_gsi(slot))),
        ])?);
    }
    aml::device(
        "PCI0",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0A08")?)?,
            aml::name("_CID", &aml::eisa_id("PNP0A03")?)?,
            aml::name("_UID", &aml::integer(0))?,
            aml::name("_SEG", &aml::integer(0))?,
            aml::name("_BBN", &aml::integer(u64::from(PCI_BUS)))?,
            aml::name("_CRS", &crs)?,
            aml::name("_PRT", &aml::package(&routes)?)?,
        ],
    )
}

fn com1() -> Result<Vec<u8>, AmlError> {
    let crs = resource::template(&[
        resource::io_port(COM1_PORT, COM1_PORTS),
        resource::irq_no_flags(COM1_ISA_IRQ)?,
    ])?;
    aml::device(
        "COM1",
        &[
            aml::name("_HID", &aml::eisa_id("PNP0501")?)?,
            aml::name("_UID", &aml::integer(0))?,
            aml::name("_CRS", &crs)?,
        ],
    )
}

/// Builds the DSDT.
pub fn build(config: DsdtConfig) -> Result<Vec<u8>, AmlError> {
    let s5 = aml::package(&[
        aml::integer(u64::from(SLP_TYP_S5)),
        aml::integer(u64::from(SLP_TYP_S5)),
        aml::integer(0),
        aml::integer(0),
    ])?;
    let mut devices = vec![pci_host_bridge()?];
    if config.com1 {
        devices.push(com1()?);
    }
    let mut body = aml::name("\\_S5", &s5)?;
    body.extend_from_slice(&aml::scope("\\_SB", &devices)?);
    Ok(table(b"DSDT", REVISION, b"FPVMDSDT", &body))
}

#[cfg(test)]
mod tests {
    use super::super::sdt::{byte_sum, HEADER_LEN};
    use super::*;

    fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
        haystack.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn header_and_checksum() {
        let t = build(DsdtConfig { com1: true }).unwrap();
        assert_eq!(&t[0..4], b"DSDT");
        assert_eq!(t[8], 2);
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(byte_sum(&t), 0);
    }

    #[test]
    fn s5_package_comes_first() {
        let t = build(DsdtConfig { com1: false }).unwrap();
        let body = &t[HEADER_LEN..];
        assert_eq!(
            &body[..16],
            &[0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 5, 0x0a, 5, 0, 0, 0x10]
        );
    }

    #[test]
    fn contains_the_host_bridge_and_com1() {
        let t = build(DsdtConfig { com1: true }).unwrap();
        let pci0 = find(&t, b"PCI0").unwrap();
        // DeviceOp (5B 82) and a PkgLength precede the name.
        let op = find(&t[..pci0], &[0x5b, 0x82]).unwrap();
        assert!(pci0 - op <= 6);
        let hid = find(&t, b"_HID").unwrap();
        assert_eq!(&t[hid + 4..hid + 9], &aml::eisa_id("PNP0A08").unwrap()[..]);
        let cid = find(&t, b"_CID").unwrap();
        assert_eq!(&t[cid + 4..cid + 9], &aml::eisa_id("PNP0A03").unwrap()[..]);
        for name in [&b"_SEG"[..], b"_BBN", b"_UID", b"_CRS", b"_PRT"] {
            assert!(
                find(&t[pci0..], name).is_some(),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        // conf1 ports, the BAR window and COM1's ports.
        assert!(find(&t, &resource::io_port(0xcf8, 8)).is_some());
        assert!(find(&t, &resource::dword_memory(0xc000_0000, 0xdfff_ffff)).is_some());
        assert!(find(&t, &resource::io_port(0x3f8, 8)).is_some());
        assert!(find(&t, &aml::eisa_id("PNP0501").unwrap()).is_some());
        let without = build(DsdtConfig { com1: false }).unwrap();
        assert!(find(&without, b"COM1").is_none());
    }

    #[test]
    fn windows_match_the_address_map() {
        use crate::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};
        assert_eq!(u64::from(MMIO_WINDOW_START), PCI_MMIO_START);
        assert_eq!(
            u64::from(MMIO_WINDOW_END) + 1,
            PCI_MMIO_START + PCI_MMIO_SIZE
        );
        // The PCI I/O window leaves every fixed port of the platform alone.
        for port in [
            virtio_devices::PCI_CONFIG_IO_PORT,
            COM1_PORT,
            crate::layout::ACPI_SLEEP_CONTROL_PORT,
            crate::layout::ACPI_RESET_PORT,
        ] {
            assert!(port < PCI_IO_WINDOW_START, "{port:#x}");
        }
    }

    #[test]
    fn prt_matches_the_mp_table_routing() {
        let t = build(DsdtConfig { com1: false }).unwrap();
        let mp = crate::boot::mptable::build(0xf0000, 1).unwrap();
        for slot in 1..32u8 {
            let entry = aml::package(&[
                aml::integer((u64::from(slot) << 16) | 0xffff),
                aml::integer(0),
                aml::integer(0),
                aml::integer(u64::from(intx_gsi(slot))),
            ])
            .unwrap();
            assert!(find(&t, &entry).is_some(), "slot {slot}");
            // The MP table's I/O interrupt entry for the slot's INTA#: source bus IRQ
            // slot << 2 on PCI bus 0, to the same IOAPIC pin.
            let mp_entry = [3, 0, 0x0f, 0, 0, slot << 2, 1, intx_gsi(slot) as u8];
            assert!(find(&mp, &mp_entry).is_some(), "MP table slot {slot}");
        }
    }
}
