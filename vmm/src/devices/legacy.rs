//! The few legacy PC ports a kernel pokes at boot: the i8042 (for its reset line), the CMOS/RTC
//! index and data ports, and the POST debug port.

use std::sync::Arc;

use super::bus::BusDevice;

/// What a guest asked for through a platform port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LegacyEvent {
    /// The i8042 "pulse reset line" command, or the ACPI reset register.
    Reset,
    /// ACPI S5 (soft off) through the sleep control register.
    PowerOff,
}

/// Where devices report [`LegacyEvent`]s; shared by every device that raises them.
pub type LegacyEvents = Arc<dyn Fn(LegacyEvent) + Send + Sync>;

/// i8042 at 0x60..0x64: status reads 0 (no data, input buffer empty); command 0xfe resets.
pub struct I8042 {
    events: LegacyEvents,
}

/// i8042 data port base.
pub const I8042_BASE: u64 = 0x60;
/// i8042 port span (0x60..0x64).
pub const I8042_LEN: u64 = 5;
const I8042_CMD_OFFSET: u64 = 4;
const I8042_RESET_CMD: u8 = 0xfe;

impl I8042 {
    /// An i8042 that reports resets on `events`.
    pub fn new(events: LegacyEvents) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == I8042_CMD_OFFSET && data.first() == Some(&I8042_RESET_CMD) {
            (self.events)(LegacyEvent::Reset);
        }
    }
}

/// CMOS at 0x70/0x71: remembers the index; data reads as 0 (no RTC update in progress).
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
        }
    }
}

/// CMOS index port.
pub const CMOS_BASE: u64 = 0x70;
/// CMOS port span.
pub const CMOS_LEN: u64 = 2;

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == 1 {
            self.ram[usize::from(self.index & 0x7f)]
        } else {
            self.index
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 {
            self.index = v & 0x7f;
        } else {
            self.ram[usize::from(self.index)] = v;
        }
    }
}

/// Ports whose writes are dropped and reads return 0 (POST code 0x80, the speaker at 0x61).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn i8042_reset_command() {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(tx);
        let mut dev = I8042::new(Arc::new(move |e| tx.lock().unwrap().send(e).unwrap()));
        dev.write(0, &[0xfe]);
        assert!(
            rx.try_recv().is_err(),
            "0xfe on the data port is not a command"
        );
        dev.write(4, &[0xfe]);
        assert_eq!(rx.try_recv().unwrap(), LegacyEvent::Reset);
        let mut b = [0xffu8];
        dev.read(4, &mut b);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn cmos_index_and_data() {
        let mut c = Cmos::default();
        c.write(0, &[0x8f]);
        c.write(1, &[0x42]);
        let mut b = [0u8];
        c.read(1, &mut b);
        assert_eq!(b[0], 0x42);
        c.write(0, &[0x0e]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0);
    }
}
