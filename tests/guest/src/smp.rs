//! Local APIC and application processors.
//!
//! The BSP switches its local APIC to x2APIC mode when CPUID offers it (MSRs through the CPL0
//! service), else uses xAPIC MMIO at 0xFEE00000 from CPL3. The number of vCPUs comes from the
//! `cpus=` command line key, else from the ACPI MADT, else from an Intel MP Specification 1.4
//! table (what a VMM without ACPI provides). APs are started with INIT-SIPI-SIPI
//! (shorthand "all excluding self") into the real-mode trampoline at `TRAMP_BASE`; if they do
//! not all arrive within a second, `guest: ap start failed` is printed and the guest runs on
//! the CPUs it has.

use crate::boot::{tramp_end, tramp_start, MAX_CPUS, TRAMP_BASE};
use crate::bootinfo::BootInfo;
use crate::kernel::{cpuid, mmio_read32, mmio_write32, rdmsr, rdtsc, wrmsr};
use crate::println;
use crate::time::{delay_us, us_to_ticks};
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// Read by the CPL0 IRQ stub: 1 = EOI through the x2APIC MSR, 0 = xAPIC MMIO.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static apic_x2: AtomicU8 = AtomicU8::new(0);
/// Interrupt counts per vector, incremented by the CPL0 IRQ stub.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static irq_counts: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
/// APs that reached Rust.
pub static APS_ONLINE: AtomicU32 = AtomicU32::new(0);

const XAPIC: u64 = 0xfee0_0000;
/// Spurious interrupt vector.
pub const SPURIOUS: u32 = 0xff;

/// Enables the BSP's local APIC; returns its APIC ID.
pub fn init_bsp_apic() -> u32 {
    let x2 = cpuid(1, 0)[2] & (1 << 21) != 0;
    if x2 {
        let base = rdmsr(0x1b);
        wrmsr(0x1b, base | (1 << 11) | (1 << 10));
        apic_x2.store(1, Ordering::SeqCst);
        wrmsr(0x80f, 0x100 | SPURIOUS as u64); // SVR: enable
        rdmsr(0x802) as u32
    } else {
        // SAFETY: the LAPIC page is mapped uncached in the hole; plain register access.
        unsafe {
            mmio_write32(XAPIC + 0xf0, 0x100 | SPURIOUS);
            mmio_read32(XAPIC + 0x20) >> 24
        }
    }
}

fn send_ipi(low: u32) {
    if apic_x2.load(Ordering::Relaxed) != 0 {
        wrmsr(0x830, low as u64);
    } else {
        // SAFETY: as in init_bsp_apic.
        unsafe {
            mmio_write32(XAPIC + 0x310, 0);
            mmio_write32(XAPIC + 0x300, low);
            let mut n = 0;
            while mmio_read32(XAPIC + 0x300) & (1 << 12) != 0 && n < 1000 {
                n += 1;
                delay_us(10);
            }
        }
    }
}

/// Counts enabled processors in the ACPI MADT (None without ACPI).
pub fn acpi_cpu_count(bi: &BootInfo, mapped_end: u64) -> Option<u32> {
    let ok = |a: u64, len: u64| a != 0 && a + len <= mapped_end;
    let rd = |a: u64, n: usize| -> u64 {
        let mut v = 0u64;
        for i in 0..n {
            // SAFETY: callers checked `ok` for the range.
            v |= (unsafe { core::ptr::read_volatile((a + i as u64) as *const u8) } as u64)
                << (8 * i);
        }
        v
    };
    let sig = |a: u64, s: &[u8]| {
        s.iter()
            .enumerate()
            .all(|(i, &c)| rd(a + i as u64, 1) as u8 == c)
    };
    let mut rsdp = bi.rsdp;
    if !ok(rsdp, 36) || !sig(rsdp, b"RSD PTR ") {
        rsdp = (0xe0000..0x100000u64)
            .step_by(16)
            .find(|&a| sig(a, b"RSD PTR "))?;
    }
    let rev = rd(rsdp + 15, 1);
    let (root, entry) = if rev >= 2 && rd(rsdp + 24, 8) != 0 {
        (rd(rsdp + 24, 8), 8)
    } else {
        (rd(rsdp + 16, 4), 4)
    };
    if !ok(root, 36) {
        return None;
    }
    let len = rd(root + 4, 4);
    if !ok(root, len) || len < 36 {
        return None;
    }
    for i in 0..(len - 36) / entry {
        let t = rd(root + 36 + i * entry, entry as usize);
        if !ok(t, 44) || !sig(t, b"APIC") {
            continue;
        }
        let tlen = rd(t + 4, 4);
        if !ok(t, tlen) {
            return None;
        }
        let (mut p, mut n) = (t + 44, 0u32);
        while p + 2 <= t + tlen {
            let (ty, l) = (rd(p, 1), rd(p + 1, 1));
            if l < 2 {
                break;
            }
            match ty {
                0 if rd(p + 4, 4) & 1 != 0 => n += 1,
                9 if rd(p + 8, 4) & 1 != 0 => n += 1,
                _ => {}
            }
            p += l;
        }
        return Some(n);
    }
    None
}

/// Enabled processors from an MP Specification table (None without one). Only low memory
/// (first MiB) and RAM are read.
pub fn mp_cpus(bi: &BootInfo) -> Option<guest_core::mptable::MpCpus> {
    let read = |a: u64| -> Option<u8> {
        if a < 0x10_0000 || bi.is_ram(a, a + 1) {
            // SAFETY: the first GiB is identity-mapped; RAM anywhere is mapped; read-only access.
            Some(unsafe { core::ptr::read_volatile(a as *const u8) })
        } else {
            None
        }
    };
    match guest_core::mptable::find(&read) {
        Ok(c) => Some(c),
        Err(guest_core::mptable::MpError::NotFound) => None,
        Err(guest_core::mptable::MpError::BadTable(t)) => {
            println!("guest: warning bad MP configuration table at {:#x}", t);
            None
        }
    }
}

/// Starts the APs so that `want` vCPUs run in total. Returns the number of running vCPUs.
pub fn start_aps(bi: &BootInfo, want: u32) -> u32 {
    let want = want.min(MAX_CPUS as u32);
    if want <= 1 {
        return 1;
    }
    if !bi.is_ram(TRAMP_BASE, TRAMP_BASE + 4096) {
        println!(
            "guest: ap start failed (no RAM at trampoline {:#x})",
            TRAMP_BASE
        );
        return 1;
    }
    // SAFETY: copies the trampoline code into low RAM, which nothing else uses after boot.
    unsafe {
        let src = core::ptr::addr_of!(tramp_start);
        let len = core::ptr::addr_of!(tramp_end) as usize - src as usize;
        core::ptr::copy_nonoverlapping(src, TRAMP_BASE as *mut u8, len.min(4096));
    }
    let vector = (TRAMP_BASE >> 12) as u32;
    let t0 = rdtsc();
    send_ipi(0x000c_4500); // INIT, assert, all excluding self
    delay_us(10_000);
    send_ipi(0x000c_4600 | vector); // SIPI
    delay_us(200);
    send_ipi(0x000c_4600 | vector);
    let deadline = rdtsc() + us_to_ticks(1_000_000);
    while APS_ONLINE.load(Ordering::Acquire) < want - 1 && rdtsc() < deadline {
        core::hint::spin_loop();
    }
    let online = APS_ONLINE.load(Ordering::Acquire);
    let ms = crate::time::ticks_to_us(rdtsc() - t0) / 1000;
    if online < want - 1 {
        println!(
            "guest: ap start failed (wanted {} cpus, {} online after {} ms)",
            want,
            online + 1,
            ms
        );
    } else {
        println!("guest: cpus online={} ap_start_ms={}", online + 1, ms);
    }
    online + 1
}

/// Sends a fixed interrupt with `vector` to this CPU (tests the IRQ path).
pub fn self_ipi(vector: u8) {
    if apic_x2.load(Ordering::Relaxed) != 0 {
        wrmsr(0x83f, vector as u64); // x2APIC SELF IPI
    } else {
        send_ipi(0x0004_4000 | vector as u32); // shorthand self, fixed
    }
}
