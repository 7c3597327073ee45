//! The 16550 UART at COM1 (0x3f8, IRQ 4), emulated by vm-superio.

use std::fs::OpenOptions;
use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::config::{ConsoleConfig, ConsoleOutputMode};

/// COM1's port base.
pub const COM1_BASE: u64 = 0x3f8;
/// COM1's port count.
pub const COM1_LEN: u64 = 8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt through an irqfd.
pub struct IrqfdTrigger(pub EventFd);

impl Trigger for IrqfdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub fn output_for(config: &ConsoleConfig) -> std::io::Result<Option<Box<dyn Write + Send>>> {
    Ok(match config.mode {
        ConsoleOutputMode::Off => None,
        ConsoleOutputMode::Null => Some(Box::new(std::io::sink())),
        ConsoleOutputMode::Tty => Some(Box::new(std::io::stdout())),
        ConsoleOutputMode::File => {
            let path = config.file.as_ref().ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "serial file= needs a path",
                )
            })?;
            Some(Box::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            ))
        }
    })
}

/// The UART as a bus device.
pub struct SerialDevice {
    serial: Serial<IrqfdTrigger, NoEvents, LineWriter>,
}

/// The UART's output. The UART model flushes after every byte the guest sends; a terminal
/// should see each byte at once (prompts have no newline), but a file gets whole lines, written
/// when their newline arrives, so readers never see half a line and the VMM makes one write
/// per line instead of one per byte.
pub struct LineWriter {
    inner: std::io::LineWriter<Box<dyn Write + Send>>,
    interactive: bool,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.interactive {
            self.inner.flush()
        } else {
            Ok(())
        }
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`; `interactive` when `out` is a terminal.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>, interactive: bool) -> Self {
        let out = LineWriter {
            inner: std::io::LineWriter::new(out),
            interactive,
        };
        SerialDevice {
            serial: Serial::new(IrqfdTrigger(irq), out),
        }
    }
}

impl SerialDevice {
    /// Queues bytes typed by the user for the guest to read; returns how many fit in the
    /// receive FIFO (0 when it is full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&v), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, v) {
                log::debug!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn registers_and_output() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()), false);
        // LSR: transmitter empty and holding register empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
        // Enable the THR-empty interrupt, then send a line.
        dev.write(1, &[0x02]);
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().is_empty(), "half a line is held back");
        dev.write(0, b"\n");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1, "THR empty raises the interrupt");
        // Scratch register round trip.
        dev.write(7, &[0x5a]);
        let mut scr = [0u8];
        dev.read(7, &mut scr);
        assert_eq!(scr[0], 0x5a);
    }

    #[test]
    fn typed_input_reaches_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()), false);
        dev.write(1, &[0x01]); // received-data interrupt on
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'o');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'k');
        assert!(irq.read().unwrap() >= 1);
        // A full FIFO takes nothing more until the guest reads.
        let flood = [b'x'; 100];
        let first = dev.enqueue_input(&flood);
        assert!(first > 0 && first < 100);
        assert_eq!(dev.enqueue_input(&flood), 0);
    }
}
