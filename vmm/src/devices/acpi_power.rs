//! The registers a hardware-reduced ACPI platform powers off and resets with: the FADT's sleep
//! control, sleep status and reset registers, byte-wide I/O ports at
//! [`ACPI_SLEEP_CONTROL_PORT`](crate::layout::ACPI_SLEEP_CONTROL_PORT) and up.
//!
//! A guest powers off (Linux `poweroff`) by writing SLP_TYP = `\_S5`'s value with SLP_EN to
//! the sleep control register; that ends the VM as a guest shutdown does. Writing the FADT's
//! reset value to the reset register resets it as the i8042 reset line does.

use super::bus::BusDevice;
use super::legacy::{LegacyEvent, LegacyEvents};
use crate::boot::acpi::{fadt::RESET_VALUE, SLP_TYP_S5};
use crate::layout::{ACPI_RESET_PORT, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT};

/// First port of the registers.
pub const ACPI_POWER_BASE: u64 = ACPI_SLEEP_CONTROL_PORT as u64;
/// Port span: sleep control, sleep status, reset.
pub const ACPI_POWER_LEN: u64 = 3;

const SLEEP_CONTROL: u64 = 0;
const SLEEP_STATUS: u64 = (ACPI_SLEEP_STATUS_PORT - ACPI_SLEEP_CONTROL_PORT) as u64;
const RESET: u64 = (ACPI_RESET_PORT - ACPI_SLEEP_CONTROL_PORT) as u64;
/// Sleep control register: SLP_TYP in bits 4:2, SLP_EN in bit 5 (ACPI 6.5 section 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
const SLP_EN: u8 = 1 << 5;

/// The sleep control, sleep status and reset registers.
pub struct AcpiPowerRegisters {
    events: LegacyEvents,
    powered_off: bool,
}

impl AcpiPowerRegisters {
    /// Registers that report power-off and reset on `events`.
    pub fn new(events: LegacyEvents) -> Self {
        AcpiPowerRegisters {
            events,
            powered_off: false,
        }
    }
}

impl BusDevice for AcpiPowerRegisters {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: WAK_STS clear (the VM never wakes from a sleep state); the others are
        // write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if slp_typ == SLP_TYP_S5 {
                    if !self.powered_off {
                        self.powered_off = true;
                        (self.events)(LegacyEvent::PowerOff);
                    }
                } else {
                    log::debug!("guest asked for sleep type {slp_typ}, which the VM lacks");
                }
            }
            RESET if value == RESET_VALUE => (self.events)(LegacyEvent::Reset),
            SLEEP_CONTROL | SLEEP_STATUS | RESET => {}
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    fn registers() -> (AcpiPowerRegisters, mpsc::Receiver<LegacyEvent>) {
        let (tx, rx) = mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let events: LegacyEvents = Arc::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        });
        (AcpiPowerRegisters::new(events), rx)
    }

    #[test]
    fn s5_with_slp_en_powers_off_once() {
        let (mut dev, rx) = registers();
        // What Linux's hardware-reduced sleep writes for S5: (5 << 2) | SLP_EN.
        dev.write(SLEEP_CONTROL, &[(SLP_TYP_S5 << 2) | SLP_EN]);
        assert_eq!(rx.try_recv().unwrap(), LegacyEvent::PowerOff);
        dev.write(SLEEP_CONTROL, &[(SLP_TYP_S5 << 2) | SLP_EN]);
        assert!(rx.try_recv().is_err(), "one power-off event");
    }

    #[test]
    fn other_writes_do_nothing() {
        let (mut dev, rx) = registers();
        dev.write(SLEEP_CONTROL, &[SLP_TYP_S5 << 2]); // no SLP_EN
        dev.write(SLEEP_CONTROL, &[(3 << 2) | SLP_EN]); // S3: not offered
        dev.write(SLEEP_STATUS, &[0x80]); // clearing WAK_STS
        dev.write(RESET, &[RESET_VALUE.wrapping_add(1)]);
        dev.write(SLEEP_CONTROL, &[]);
        assert!(rx.try_recv().is_err());
        let mut b = [0xffu8];
        dev.read(SLEEP_STATUS, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn reset_value_resets() {
        let (mut dev, rx) = registers();
        dev.write(RESET, &[RESET_VALUE]);
        assert_eq!(rx.try_recv().unwrap(), LegacyEvent::Reset);
    }
}
