//! The Fixed ACPI Description Table (ACPI 6.5 section 5.2.9): a hardware-reduced platform
//! whose only fixed registers are the sleep control and status registers (S5 power-off) and
//! the reset register, all byte-wide I/O ports the VMM implements.

use super::sdt::{io_port_gas, table, Writer};
use crate::layout::{ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT};

/// FADT major version (ACPI 6.x).
const REVISION: u8 = 6;
/// FADT minor version (ACPI 6.5).
const MINOR_VERSION: u8 = 5;
/// The FADT's size in ACPI 6.x.
pub const FADT_LEN: usize = 276;

/// Flags: WBINVD works.
pub const FLAG_WBINVD: u32 = 1 << 0;
/// Flags: no fixed-feature power button.
pub const FLAG_PWR_BUTTON: u32 = 1 << 4;
/// Flags: no fixed-feature sleep button.
pub const FLAG_SLP_BUTTON: u32 = 1 << 5;
/// Flags: the reset register is supported.
pub const FLAG_RESET_REG_SUP: u32 = 1 << 10;
/// Flags: hardware-reduced ACPI (no PM1/GPE blocks, no SCI, no FACS).
pub const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;

/// IA-PC boot architecture flags: legacy ISA devices (COM1, CMOS) are present.
pub const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot architecture flags: no VGA hardware to probe.
pub const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// The value written to the reset register to reset the VM.
pub const RESET_VALUE: u8 = 0x01;

/// Builds the FADT pointing at the DSDT at guest-physical `dsdt`.
pub fn build(dsdt: u64) -> Vec<u8> {
    let zero_gas = [0u8; 12];
    let mut w = Writer::default();
    w.u32(0) // FIRMWARE_CTRL: no FACS on a hardware-reduced platform
        .u32(u32::try_from(dsdt).unwrap_or(0)) // DSDT (the same as X_DSDT when below 4 GiB)
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(0) // SCI_INT: none
        .u32(0) // SMI_CMD: no SMM
        .u8(0) // ACPI_ENABLE
        .u8(0) // ACPI_DISABLE
        .u8(0) // S4BIOS_REQ
        .u8(0) // PSTATE_CNT
        .bytes(&[0; 32]) // PM1a/b event and control, PM2 control, PM timer, GPE0/1 blocks
        .bytes(&[0; 8]) // their lengths, GPE1_BASE, CST_CNT
        .u16(0) // P_LVL2_LAT
        .u16(0) // P_LVL3_LAT
        .u16(0) // FLUSH_SIZE
        .u16(0) // FLUSH_STRIDE
        .u8(0) // DUTY_OFFSET
        .u8(0) // DUTY_WIDTH
        .u8(0) // DAY_ALRM
        .u8(0) // MON_ALRM
        .u8(0) // CENTURY
        .u16(BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_VGA_NOT_PRESENT)
        .u8(0) // reserved
        .u32(
            FLAG_WBINVD
                | FLAG_PWR_BUTTON
                | FLAG_SLP_BUTTON
                | FLAG_RESET_REG_SUP
                | FLAG_HW_REDUCED_ACPI,
        )
        .bytes(&io_port_gas(ACPI_RESET_PORT))
        .u8(RESET_VALUE)
        .u16(0) // ARM_BOOT_ARCH
        .u8(MINOR_VERSION)
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt); // X_DSDT
    for _ in 0..8 {
        // X_PM1a/b_EVT_BLK, X_PM1a/b_CNT_BLK, X_PM2_CNT_BLK, X_PM_TMR_BLK, X_GPE0/1_BLK
        w.bytes(&zero_gas);
    }
    w.bytes(&io_port_gas(ACPI_SLEEP_CONTROL_PORT))
        .bytes(&io_port_gas(ACPI_SLEEP_STATUS_PORT))
        .u64(0); // hypervisor vendor identity
    table(b"FACP", REVISION, b"FPVMFADT", &w.0)
}

#[cfg(test)]
mod tests {
    use super::super::sdt::byte_sum;
    use super::*;

    fn u32_at(t: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(t[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn size_checksum_and_dsdt_pointers() {
        let t = build(0xe_1000);
        assert_eq!(t.len(), FADT_LEN);
        assert_eq!(u32_at(&t, 4) as usize, FADT_LEN);
        assert_eq!(&t[0..4], b"FACP");
        assert_eq!(t[8], 6);
        assert_eq!(t[131], 5, "FADT minor version");
        assert_eq!(byte_sum(&t), 0);
        assert_eq!(u32_at(&t, 36), 0, "no FACS");
        assert_eq!(u32_at(&t, 40), 0xe_1000);
        assert_eq!(
            u64::from_le_bytes(t[140..148].try_into().unwrap()),
            0xe_1000
        );
    }

    #[test]
    fn hardware_reduced_with_sleep_and_reset_registers() {
        let t = build(0xe_1000);
        let flags = u32_at(&t, 112);
        assert_ne!(flags & FLAG_HW_REDUCED_ACPI, 0);
        assert_ne!(flags & FLAG_RESET_REG_SUP, 0);
        assert_eq!(u16::from_le_bytes([t[109], t[110]]), 0b101);
        assert_eq!(&t[46..48], &[0, 0], "no SCI");
        assert!(
            t[56..88].iter().all(|&b| b == 0),
            "no PM1/PM2/timer/GPE blocks"
        );
        assert!(t[148..244].iter().all(|&b| b == 0), "no extended PM blocks");
        // Generic address structures: system I/O, 8 bits wide, byte access, at the port.
        assert_eq!(&t[116..128], &io_port_gas(ACPI_RESET_PORT));
        assert_eq!(t[128], RESET_VALUE);
        assert_eq!(&t[244..256], &io_port_gas(ACPI_SLEEP_CONTROL_PORT));
        assert_eq!(&t[256..268], &io_port_gas(ACPI_SLEEP_STATUS_PORT));
        assert_eq!(t[244], 1, "system I/O space");
        assert_eq!(
            u16::from_le_bytes([t[248], t[249]]),
            ACPI_SLEEP_CONTROL_PORT
        );
    }
}
