//! Freestanding x86-64 test guest for the free-page-hinting VMM (see `tests/guest/README.md`).
//!
//! Boots through PVH, does a minimal CPL0 setup in assembly (`boot.rs`) and runs everything
//! else at CPL3, where kvm_pvm executes code natively. The BSP sets up memory, the workload and
//! the virtio-balloon driver, prints `guest: ready ...`, then loops: hot rewrites (unless an AP
//! does them), balloon work, and a full verification at least once a second.
#![no_std]
#![no_main]

mod balloon;
mod boot;
mod bootinfo;
mod kernel;
mod mm;
mod paging;
mod pci;
mod serial;
mod smp;
mod time;
mod virtio;
mod workload;

use core::sync::atomic::Ordering;
use guest_core::cmdline::Config;
use guest_core::PAGE_SIZE;

/// Entry from `boot.rs` at CPL3 on every vCPU. `cpu` 0 is the BSP.
#[no_mangle]
pub extern "C" fn guest_entry(cpu: u64, start_info: u64) -> ! {
    if cpu != 0 {
        ap_main(cpu)
    }
    bsp_main(start_info)
}

fn bsp_main(start_info: u64) -> ! {
    let t_start = kernel::rdtsc();
    serial::init();
    println!("guest: boot (cpl3)");
    let bi = match bootinfo::BootInfo::parse(start_info) {
        Ok(bi) => bi,
        Err(bootinfo::Error::BadMagic(m)) => {
            fail(format_args!("bad hvm_start_info magic {:#x}", m))
        }
        Err(bootinfo::Error::NoMemmap) => fail(format_args!("no memory map in hvm_start_info")),
        Err(bootinfo::Error::Unmapped(a)) => {
            fail(format_args!("boot data at {:#x} outside the first GiB", a))
        }
    };
    let cfg = Config::parse_with(bi.cmdline(), |k, v| {
        println!("guest: warning bad value {}={}", k, v)
    });
    println!("guest: cmdline \"{}\"", bi.cmdline());
    for r in &bi.map[..bi.entries] {
        println!(
            "guest: memmap {:#012x}-{:#012x} type {}",
            r.addr,
            r.end(),
            r.kind
        );
    }
    let ecam = cfg.pci_ecam.map(|a| (a, 256u64 << 20));
    let mapped = paging::map_all(&bi, ecam.as_slice());
    if mapped.truncated {
        println!("guest: warning RAM above {:#x} not used", mapped.end);
    }
    let cal = time::calibrate();
    println!(
        "guest: tsc {} kHz ({}; pit {} kHz)",
        cal.hz / 1000,
        cal.source,
        cal.pit_hz.unwrap_or(0) / 1000
    );

    // memory: carve metadata, then the allocator over the rest
    let max_pfn = bi.ram_end().min(mapped.end) / PAGE_SIZE;
    let ram_pages = bi.ram_bytes() / PAGE_SIZE;
    let live_cap =
        (cfg.used_mib * 256 + cfg.fragment_mib * 128 + cfg.grow_mib * 256).min(ram_pages) as usize;
    let hot_cap = (cfg.hot_mib * 256).min(ram_pages) as usize;
    let hint_cap = (ram_pages >> 10) as usize + 16;
    let need =
        mm::buddy_metadata_bytes(max_pfn) + 4 * (live_cap + hot_cap + hint_cap) as u64 + 4096;
    let Some(mut carve) = mm::Carve::find(&bi, need, max_pfn * PAGE_SIZE) else {
        fail(format_args!("no room for {} bytes of metadata", need))
    };
    let Some(mut buddy) = mm::build_allocator(&bi, &mut carve, max_pfn) else {
        fail(format_args!("allocator setup failed"))
    };
    let (Some(live), Some(hot), Some(hint_list)) = (
        carve.list(live_cap),
        carve.list(hot_cap),
        carve.list(hint_cap),
    ) else {
        fail(format_args!("metadata carve too small"))
    };
    println!(
        "guest: ram {} MiB, allocator {} free pages, metadata {} KiB at {:#x}",
        bi.ram_bytes() >> 20,
        buddy.free_pages(),
        (carve.end() - carve.start) >> 10,
        carve.start
    );

    // CPUs
    let apic_id = smp::init_bsp_apic();
    let want = if let Some(n) = cfg.cpus {
        println!("guest: cpus source=cmdline count={}", n);
        n
    } else if let Some(n) = smp::acpi_cpu_count(&bi, mapped.end) {
        println!("guest: cpus source=acpi count={}", n);
        n
    } else if let Some(mp) = smp::mp_cpus(&bi) {
        println!(
            "guest: cpus source=mptable count={} apic_ids={} bsp_apic_id={} at {:#x}",
            mp.count,
            IdList(mp.ids()),
            mp.bsp_apic_id.map_or(-1, |b| b as i32),
            mp.pointer
        );
        if mp.bsp_apic_id.is_some_and(|b| b as u32 != apic_id) {
            println!(
                "guest: warning MP table BSP apic id differs from ours ({})",
                apic_id
            );
        }
        mp.count
    } else {
        println!("guest: cpus source=none count=1");
        1
    };
    let cpus = smp::start_aps(&bi, want);

    // workload
    let t_work = kernel::rdtsc();
    let mut w = workload::setup(
        &mut buddy,
        cfg.used_mib,
        cfg.fragment_mib,
        cfg.hot_mib,
        cfg.dirty_mib,
        live,
        hot,
    );
    w.share_hot();
    if let Some(&p) = w.live.as_slice().last() {
        SELFTEST_PAGE
            .0
            .store(p as u64 * PAGE_SIZE, Ordering::Relaxed);
    }
    if cpus > 1 && w.hot.len() > 0 {
        workload::HOT_ON_AP.store(true, Ordering::Release);
    }
    let work_ms = time::ticks_to_us(kernel::rdtsc() - t_work) / 1000;

    // balloon
    let mut dev = balloon::Balloon::probe(&cfg, apic_id, hint_list, &mut buddy);

    println!(
        "guest: setup_ms={} workload_ms={} used={} fragment_kept={} hot={} dirty={} cpus={} hint={}",
        time::ticks_to_us(kernel::rdtsc() - t_start) / 1000,
        work_ms,
        w.used_pages,
        w.fragment_kept,
        w.hot.len(),
        w.dirty_pages,
        cpus,
        cfg.hint.name()
    );
    println!(
        "guest: ready used_pages={} free_pages={}",
        w.held_pages(),
        buddy.free_pages()
    );

    let power_off = cfg.poweroff_after.and_then(|_| find_power_off(&bi));
    main_loop(&cfg, &mut w, &mut buddy, &mut dev, power_off)
}

fn main_loop(
    cfg: &Config,
    w: &mut workload::Workload,
    buddy: &mut guest_core::buddy::Buddy,
    dev: &mut Option<balloon::Balloon>,
    power_off: Option<guest_core::acpi::PowerOff>,
) -> ! {
    let period = time::us_to_ticks(cfg.verify_ms * 1000);
    let mut next = kernel::rdtsc() + period;
    let mut seq = 0u64;
    let mut hot_fails_seen = 0u64;
    let cfg_selftest = cfg.selftest;
    let grow_period = time::us_to_ticks(guest_core::cmdline::GROW_PERIOD_MS * 1000);
    let mut grow_left = cfg.grow_mib * 256;
    let mut grow_next = kernel::rdtsc();
    loop {
        if !workload::HOT_ON_AP.load(Ordering::Relaxed) {
            workload::hot_pass();
        }
        if grow_left > 0 && kernel::rdtsc() >= grow_next {
            let want = grow_left.min(guest_core::cmdline::GROW_STEP_PAGES);
            let added = w.grow(buddy, want);
            grow_left = if added < want { 0 } else { grow_left - added };
            grow_next += grow_period;
            if grow_left == 0 {
                println!("guest: grow done live_pages={}", w.live.len());
            }
        }
        if let Some(d) = dev.as_mut() {
            d.poll(buddy);
        }
        let now = kernel::rdtsc();
        if now >= next || next.saturating_sub(now) > period {
            seq += 1;
            let t0 = kernel::rdtsc();
            let mut shown = 0usize;
            let mut first_gpa = 0u64;
            let mut report = |gpa: u64, gen: u64, m: guest_core::pattern::Mismatch| {
                if shown == 0 {
                    first_gpa = gpa;
                }
                if shown < workload::MAX_REPORTED {
                    println!(
                        "guest: verify FAILED seq={} page={:#x} gen={} word={} got={:#x} want={:#x}",
                        seq, gpa, gen, m.word, m.got, m.want
                    );
                }
                shown += 1;
            };
            let mut failed = w.verify_live(|gpa, m| report(gpa, workload::LIVE_GEN, m));
            let hf = workload::HOT_FAILS.load(Ordering::Acquire);
            workload::drain_hot_failures(|f| report(f.gpa, f.gen, f.m));
            failed += hf - hot_fails_seen;
            hot_fails_seen = hf;
            let us = time::ticks_to_us(kernel::rdtsc() - t0);
            if failed == 0 {
                println!("guest: verify ok seq={} pages={}", seq, w.held_pages());
            } else if failed as usize > workload::MAX_REPORTED {
                println!(
                    "guest: verify FAILED seq={} page={:#x} failed_pages={} (only the first {} listed) verify_us={}",
                    seq, first_gpa, failed, workload::MAX_REPORTED, us
                );
            }
            if seq == 1 || seq.is_multiple_of(64) {
                println!(
                    "guest: verify_us={} hot_gen={}",
                    us,
                    workload::HOT_GEN.load(Ordering::Relaxed)
                );
            }
            next = t0 + period;
            if seq == 3 {
                selftest(cfg_selftest);
            }
            if cfg.poweroff_after == Some(seq) {
                match power_off {
                    Some(p) => {
                        println!("guest: poweroff port={:#x} value={:#x}", p.port, p.value);
                        kernel::outb(p.port, p.value);
                    }
                    None => {
                        println!("guest: poweroff failed (no ACPI sleep control register or \\_S5)")
                    }
                }
            }
        }
        kernel::pause();
    }
}

/// `poweroff=<seq>`: the FADT's sleep control register and the `\_S5` value, as an OS finds them.
fn find_power_off(bi: &bootinfo::BootInfo) -> Option<guest_core::acpi::PowerOff> {
    let read = |a: u64| -> Option<u8> {
        if a < 0x10_0000 || bi.is_ram(a, a + 1) {
            // SAFETY: the first MiB and all RAM are identity-mapped (as in smp::mp_cpus); read-only.
            Some(unsafe { core::ptr::read_volatile(a as *const u8) })
        } else {
            None
        }
    };
    guest_core::acpi::find_power_off(&read, bi.rsdp)
}

/// Comma-separated APIC ids for a serial line.
struct IdList<'a>(&'a [u8]);
impl core::fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { "" } else { "," }, id)?;
        }
        Ok(())
    }
}

/// `selftest=fault|corrupt` (after the third verification): proves that a CPL3 fault and a
/// corrupted live page are reported on serial.
fn selftest(what: guest_core::cmdline::SelfTest) {
    use guest_core::cmdline::SelfTest;
    match what {
        SelfTest::None => {}
        SelfTest::Fault => {
            // SAFETY: deliberately touches an unmapped address to exercise the fault path.
            let v = unsafe { core::ptr::read_volatile(0x7fff_dead_0000u64 as *const u64) };
            println!("guest: selftest fault did not fault ({})", v);
        }
        SelfTest::Irq => {
            let v = balloon::CONFIG_VECTOR as usize;
            let before = smp::irq_counts[v].load(Ordering::Relaxed);
            smp::self_ipi(v as u8);
            time::delay_us(10_000);
            let after = smp::irq_counts[v].load(Ordering::Relaxed);
            println!(
                "guest: selftest irq vector={:#x} count {} -> {}",
                v, before, after
            );
        }
        SelfTest::Corrupt => {
            if let Some(p) = SELFTEST_PAGE.get() {
                // SAFETY: a live workload page; corrupting one word is the point of the test.
                unsafe { core::ptr::write_volatile((p + 8 * 100) as *mut u64, 0) };
                println!("guest: selftest corrupted page {:#x}", p);
            }
        }
    }
}

/// A live page for `selftest=corrupt`.
struct SelfTestPage(core::sync::atomic::AtomicU64);
impl SelfTestPage {
    fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&p| p != 0)
    }
}
static SELFTEST_PAGE: SelfTestPage = SelfTestPage(core::sync::atomic::AtomicU64::new(0));

/// Application processors: announce, then run the hot loop when the BSP hands it over.
fn ap_main(cpu: u64) -> ! {
    smp::APS_ONLINE.fetch_add(1, Ordering::AcqRel);
    loop {
        if cpu == 1 && workload::HOT_ON_AP.load(Ordering::Acquire) {
            workload::hot_pass();
        } else {
            time::delay_us(1000);
        }
    }
}

fn fail(args: core::fmt::Arguments) -> ! {
    serial::print_line(format_args!("guest: FATAL {}", args));
    kernel::exit(0x7d)
}

/// Exception report, entered at CPL3 (interrupts off) from the CPL0 fault stub.
#[no_mangle]
pub extern "C" fn guest_fault(vector: u64, error: u64, rip: u64, cr2: u64, cs: u64, rsp: u64) -> ! {
    serial::print_line_force(format_args!(
        "guest: FAULT vector={} error={:#x} rip={:#x} cr2={:#x} cs={:#x} rsp={:#x}",
        vector, error, rip, cr2, cs, rsp
    ));
    kernel::exit(0x7e)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::print_line_force(format_args!("guest: PANIC {}", info));
    kernel::exit(0x7c)
}

// ---- no libc: the compiler may emit calls to these ----

/// memcpy
///
/// # Safety
/// The usual C contract: valid pointers for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") d => _, inout("rsi") s => _,
                     options(nostack, preserves_flags));
    d
}

/// memmove
///
/// # Safety
/// The usual C contract: valid pointers for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if n == 0 || (d as usize) <= (s as usize) || (d as usize) >= (s as usize + n) {
        return memcpy(d, s, n);
    }
    core::arch::asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") d.add(n - 1) => _,
                     inout("rsi") s.add(n - 1) => _, options(nostack));
    d
}

/// memset
///
/// # Safety
/// The usual C contract: valid pointers for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") d => _, in("al") c as u8,
                     options(nostack, preserves_flags));
    d
}

/// memcmp
///
/// # Safety
/// The usual C contract: valid pointers for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (
            core::ptr::read_volatile(a.add(i)),
            core::ptr::read_volatile(b.add(i)),
        );
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// bcmp
///
/// # Safety
/// The usual C contract: valid pointers for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

/// Referenced by the precompiled libcore in some builds even with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
