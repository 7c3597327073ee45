//! CPL3 access to the machine: port I/O (granted by the TSS I/O bitmap), MMIO, the TSC, and the
//! CPL0 services behind `int3` (see `boot.rs`).

use crate::boot::svc;
use core::arch::asm;

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: as above.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a dword from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a dword to an I/O port.
#[inline(always)]
pub fn outl(port: u16, v: u32) {
    // SAFETY: as above.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads the time stamp counter (native at CPL3).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc has no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

/// Spin-wait hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// CPUID (not intercepted at CPL3).
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn service(n: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: the int3 gate runs `svc_entry`, which only touches rax/rcx/rdx and what the
    // service is asked to do; iretq restores everything else.
    unsafe {
        asm!("int3", inout("rax") n => ret, in("rdi") a, in("rsi") b, out("rcx") _, out("rdx") _,
             options(nostack))
    };
    ret
}

/// Writes a model-specific register (CPL0 service).
pub fn wrmsr(msr: u32, v: u64) {
    service(svc::WRMSR, msr as u64, v);
}

/// Reads a model-specific register (CPL0 service).
pub fn rdmsr(msr: u32) -> u64 {
    service(svc::RDMSR, msr as u64, 0)
}

/// Writes a u64 at a physical (= virtual) address from CPL0: used for page-table entries, so
/// that the CPL3 code never writes a live page table.
///
/// # Safety
/// `addr` must be a valid, 8-byte aligned address whose change is harmless to the guest.
pub unsafe fn kernel_write64(addr: u64, v: u64) {
    service(svc::WRITE64, addr, v);
}

/// Reloads CR3.
pub fn flush_tlb() {
    service(svc::FLUSH_TLB, 0, 0);
}

/// Waits (halted at CPL0) for the next interrupt.
#[allow(dead_code)]
pub fn wait_irq() {
    service(svc::WAIT_IRQ, 0, 0);
}

/// Volatile 32-bit MMIO read.
///
/// # Safety
/// `addr` must be mapped (identity map) and 4-byte aligned.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    core::ptr::read_volatile(addr as *const u32)
}

/// Volatile 32-bit MMIO write.
///
/// # Safety
/// As [`mmio_read32`].
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, v: u32) {
    core::ptr::write_volatile(addr as *mut u32, v)
}

/// Volatile 16-bit MMIO read.
///
/// # Safety
/// As [`mmio_read32`], 2-byte aligned.
#[inline(always)]
pub unsafe fn mmio_read16(addr: u64) -> u16 {
    core::ptr::read_volatile(addr as *const u16)
}

/// Volatile 16-bit MMIO write.
///
/// # Safety
/// As [`mmio_read16`].
#[inline(always)]
pub unsafe fn mmio_write16(addr: u64, v: u16) {
    core::ptr::write_volatile(addr as *mut u16, v)
}

/// Volatile 8-bit MMIO read.
///
/// # Safety
/// `addr` must be mapped.
#[inline(always)]
pub unsafe fn mmio_read8(addr: u64) -> u8 {
    core::ptr::read_volatile(addr as *const u8)
}

/// Volatile 8-bit MMIO write.
///
/// # Safety
/// As [`mmio_read8`].
#[inline(always)]
pub unsafe fn mmio_write8(addr: u64, v: u8) {
    core::ptr::write_volatile(addr as *mut u8, v)
}

/// Ends the guest: writes the isa-debug-exit port (QEMU; our VMM ignores it), then spins.
pub fn exit(code: u8) -> ! {
    outb(0xf4, code);
    loop {
        pause();
    }
}

/// Reads a word from an I/O port.
#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("in ax, dx", out("ax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, v: u16) {
    // SAFETY: as above.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Volatile 64-bit MMIO write (as two 32-bit writes, low first).
///
/// # Safety
/// As [`mmio_write32`], 8-byte aligned.
pub unsafe fn mmio_write64(addr: u64, v: u64) {
    mmio_write32(addr, v as u32);
    mmio_write32(addr + 4, (v >> 32) as u32);
}
