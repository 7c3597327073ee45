//! 16550 UART at 0x3f8, driven by port I/O from CPL3. Lines are written under a spinlock so
//! that the vCPUs never interleave characters. If the UART is absent (LSR reads 0xff or never
//! shows THR empty), output is dropped instead of hanging.

use crate::kernel::{inb, outb, pause};
use core::sync::atomic::{AtomicBool, Ordering};
use guest_core::fmt::Line;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const THR_EMPTY: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);
static ABSENT: AtomicBool = AtomicBool::new(false);

/// Programs 115200 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(COM1 + 1, 0x00); // IER: no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1 = 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0x07); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
    if inb(LSR) == 0xff {
        ABSENT.store(true, Ordering::Relaxed);
    }
}

fn put_byte(b: u8) {
    if ABSENT.load(Ordering::Relaxed) {
        return;
    }
    let mut spins = 0u32;
    while inb(LSR) & THR_EMPTY == 0 {
        spins += 1;
        if spins > 100_000 {
            ABSENT.store(true, Ordering::Relaxed);
            return;
        }
        pause();
    }
    outb(COM1, b);
}

fn lock(force_after: Option<u32>) {
    let mut spins = 0u32;
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spins += 1;
        if force_after.is_some_and(|n| spins > n) {
            return;
        }
        pause();
    }
}

/// Writes raw bytes as one unit.
pub fn write_bytes(s: &[u8]) {
    lock(None);
    for &b in s {
        put_byte(b);
    }
    LOCK.store(false, Ordering::Release);
}

/// Formats and writes one line (a newline is appended; lines longer than 254 bytes are cut).
pub fn print_line(args: core::fmt::Arguments) {
    let mut l = Line::<256>::new();
    let _ = core::fmt::write(&mut l, args);
    let _ = core::fmt::Write::write_str(&mut l, "\n");
    write_bytes(l.as_bytes());
}

/// Like [`print_line`], but takes the lock only if it can (for the fault path, where the lock
/// holder may be the CPU that faulted).
pub fn print_line_force(args: core::fmt::Arguments) {
    let mut l = Line::<256>::new();
    let _ = core::fmt::write(&mut l, args);
    let _ = core::fmt::Write::write_str(&mut l, "\n");
    lock(Some(1_000_000));
    for &b in l.as_bytes() {
        put_byte(b);
    }
    LOCK.store(false, Ordering::Release);
}

/// `println!`-like macro writing one line to the serial port.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::serial::print_line(format_args!($($arg)*)) };
}
