//! Time keeping with the TSC (readable natively at CPL3). The frequency comes from CPUID
//! (hypervisor leaf 0x40000010, or leaf 0x15) when present and is cross-checked against the PIT
//! (channel 0, ports 0x40/0x43); without a usable CPUID value the PIT measurement is used, and
//! leaf 0x16 or a 2 GHz guess are the last resorts.

use crate::kernel::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(2_000_000_000);
const PIT_HZ: u64 = 1_193_182;

/// Where the frequency came from.
pub struct Calibration {
    /// TSC ticks per second.
    pub hz: u64,
    /// Source name.
    pub source: &'static str,
    /// PIT measurement, if the PIT answered.
    pub pit_hz: Option<u64>,
}

fn cpuid_hz() -> Option<(u64, &'static str)> {
    let max_hv = cpuid(0x4000_0000, 0)[0];
    if (0x4000_0010..0x4001_0000).contains(&max_hv) {
        let khz = cpuid(0x4000_0010, 0)[0] as u64;
        if khz > 0 {
            return Some((khz * 1000, "cpuid 0x40000010"));
        }
    }
    let max = cpuid(0, 0)[0];
    if max >= 0x15 {
        let [den, num, crystal, _] = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            return Some((crystal as u64 * num as u64 / den as u64, "cpuid 0x15"));
        }
    }
    None
}

fn pit_read() -> u16 {
    outb(0x43, 0x00); // latch channel 0
    let lo = inb(0x40) as u16;
    let hi = inb(0x40) as u16;
    (hi << 8) | lo
}

/// Measures the TSC against ~50 ms of PIT channel 0 (mode 2, period 65536).
fn pit_hz() -> Option<u64> {
    outb(0x43, 0x34); // channel 0, lo/hi, mode 2, binary
    outb(0x40, 0);
    outb(0x40, 0);
    let mut prev = pit_read();
    let (t0, mut t1) = (rdtsc(), 0);
    let mut ticks = 0u64;
    let mut same = 0u32;
    let mut samples = 0u32;
    while ticks < PIT_HZ / 20 {
        let cur = pit_read();
        samples += 1;
        if cur == prev {
            same += 1;
            if same > 2000 {
                break;
            }
        } else {
            same = 0;
        }
        ticks += prev.wrapping_sub(cur) as u64;
        prev = cur;
        t1 = rdtsc();
        if samples > 200_000 {
            break;
        }
    }
    outb(0x43, 0x30); // channel 0, mode 0 (one-shot): stop the periodic interrupt source
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    if ticks < PIT_HZ / 40 || t1 <= t0 {
        return None;
    }
    Some(((t1 - t0) as u128 * PIT_HZ as u128 / ticks as u128) as u64)
}

/// Determines the TSC frequency and installs it.
pub fn calibrate() -> Calibration {
    let pit = pit_hz();
    let (hz, source) = match (cpuid_hz(), pit) {
        (Some((c, s)), Some(p)) if c.abs_diff(p) <= p / 50 => (c, s),
        (Some(_), Some(p)) | (None, Some(p)) => (p, "pit"),
        (Some((c, s)), None) => (c, s),
        (None, None) => {
            let mhz = if cpuid(0, 0)[0] >= 0x16 {
                cpuid(0x16, 0)[0] as u64
            } else {
                0
            };
            if mhz > 0 {
                (mhz * 1_000_000, "cpuid 0x16")
            } else {
                (2_000_000_000, "guess")
            }
        }
    };
    TSC_HZ.store(hz.max(1_000_000), Ordering::Relaxed);
    Calibration {
        hz,
        source,
        pit_hz: pit,
    }
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Converts a TSC delta to microseconds.
pub fn ticks_to_us(t: u64) -> u64 {
    (t as u128 * 1_000_000 / tsc_hz() as u128) as u64
}

/// TSC ticks for `us` microseconds.
pub fn us_to_ticks(us: u64) -> u64 {
    (us as u128 * tsc_hz() as u128 / 1_000_000) as u64
}

/// Busy-waits `us` microseconds (with `pause`).
pub fn delay_us(us: u64) {
    let end = rdtsc().saturating_add(us_to_ticks(us));
    while rdtsc() < end {
        crate::kernel::pause();
    }
}
