//! The identity map beyond the first GiB, built at CPL3, up to 1 TiB of guest-physical space.
//!
//! The boot code maps GiB 0 only (512 PDEs at emulated CPL0 speed). Here, at native speed, the
//! page directories for every further GiB that holds RAM are filled while they are not yet part
//! of the live hierarchy (so no write hits a shadowed page table), then linked into the PDPT
//! with one CPL0 write each; GiBs 512 and up hang off a second PDPT, linked into PML4[1] once
//! any of them is. Page directories of GiBs with nothing to map are never written (4 KiB of
//! page tables per GiB in use). 2 MiB pages, U=1 everywhere. RAM is write-back; everything else
//! below 4 GiB (the MMIO hole: PCI windows, ECAM, IOAPIC, LAPIC) is uncached (PCD|PWT), as are
//! extra MMIO windows the caller names (e.g. an ECAM above 4 GiB).

use crate::boot::{boot_pdpt, boot_pds, NR_PDPTS, NR_PDS};
use crate::bootinfo::BootInfo;
use crate::kernel::{flush_tlb, kernel_write64};

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
/// P | RW | US | PS
const WB: u64 = 0x87;
/// P | RW | US | PWT | PCD | PS
const UC: u64 = 0x9f;

/// Result of [`map_all`].
pub struct Mapped {
    /// One past the highest mapped address.
    pub end: u64,
    /// RAM above this was left unmapped (more than `NR_PDS` GiB).
    pub truncated: bool,
}

/// Maps all RAM, the 3..4 GiB hole and `mmio` windows (`(start, len)`).
pub fn map_all(bi: &BootInfo, mmio: &[(u64, u64)]) -> Mapped {
    let ram_end = bi.ram_end();
    let mut top = ram_end.max(4 * GIB);
    for &(a, l) in mmio {
        top = top.max(a + l);
    }
    let gibs = top.div_ceil(GIB).min(NR_PDS as u64);
    let is_mmio = |a: u64, b: u64| a < 4 * GIB || mmio.iter().any(|&(s, l)| s < b && a < s + l);
    for g in 1..gibs {
        // SAFETY: boot_pds[g] (g >= 1) is not linked yet; nothing else references it.
        let pd = unsafe { &mut *core::ptr::addr_of_mut!(boot_pds[g as usize]) };
        let mut any = false;
        for (i, e) in pd.iter_mut().enumerate() {
            let a = g * GIB + i as u64 * MIB2;
            *e = if bi.overlaps_ram(a, a + MIB2) {
                a | WB
            } else if is_mmio(a, a + MIB2) {
                a | UC
            } else {
                0
            };
            any |= *e != 0;
        }
        if any {
            let pd_pa = pd.as_ptr() as u64;
            // SAFETY: a PDPT entry of an unused GiB, pointing to a fully built PD.
            unsafe {
                kernel_write64(
                    core::ptr::addr_of_mut!(boot_pdpt[g as usize]) as u64,
                    pd_pa | 7,
                )
            };
        }
    }
    for (i, first) in (0..NR_PDPTS as u64).map(|i| (i, i * 512)).skip(1) {
        // SAFETY: reading the PDPT entries this function wrote.
        let used = (first..(first + 512).min(gibs))
            .any(|g| unsafe { core::ptr::addr_of!(boot_pdpt[g as usize]).read() } != 0);
        if used {
            let pdpt_pa = core::ptr::addr_of!(boot_pdpt) as u64 + first * 8;
            // SAFETY: PML4 entry `i` (unused so far) points to a PDPT whose entries all point to
            // fully built PDs.
            unsafe { kernel_write64(crate::boot::boot_pml4_addr() + 8 * i, pdpt_pa | 7) };
        }
    }
    flush_tlb();
    Mapped {
        end: gibs * GIB,
        truncated: top > gibs * GIB && ram_end > gibs * GIB,
    }
}

/// Extra page-table pages for MMIO mapped after boot (BARs outside the mapped range).
const POOL_PAGES: usize = 8;
#[repr(C, align(4096))]
struct Pool([[u64; 512]; POOL_PAGES]);
static mut POOL: Pool = Pool([[0; 512]; POOL_PAGES]);
static mut POOL_USED: usize = 0;

fn entry(table: u64, i: u64) -> u64 {
    // SAFETY: `table` is a page-table page of the identity map.
    unsafe { core::ptr::read_volatile((table + 8 * i) as *const u64) }
}

/// Returns the table the entry `i` of `table` points to, creating an empty one if needed.
fn next_table(table: u64, i: u64) -> Option<u64> {
    let e = entry(table, i);
    if e & 1 != 0 {
        return if e & 0x80 != 0 {
            None
        } else {
            Some(e & 0x000f_ffff_ffff_f000)
        };
    }
    // SAFETY: BSP-only, during setup.
    unsafe {
        if POOL_USED >= POOL_PAGES {
            return None;
        }
        let page = core::ptr::addr_of_mut!(POOL.0[POOL_USED]) as u64;
        POOL_USED += 1;
        kernel_write64(table + 8 * i, page | 7);
        Some(page)
    }
}

/// Maps `[addr, addr + len)` uncached if it is not mapped yet (MMIO BARs placed anywhere).
/// Returns false if it cannot (out of table pages, or a 1 GiB page in the way).
pub fn map_mmio(addr: u64, len: u64) -> bool {
    let pml4 = crate::boot::boot_pml4_addr();
    let mut a = addr & !(MIB2 - 1);
    while a < addr + len {
        let (i4, i3, i2) = ((a >> 39) & 511, (a >> 30) & 511, (a >> 21) & 511);
        let Some(pdpt) = next_table(pml4, i4) else {
            return false;
        };
        let Some(pd) = next_table(pdpt, i3) else {
            return false;
        };
        if entry(pd, i2) & 1 == 0 {
            // SAFETY: a not-present PDE of the identity map becomes an uncached 2 MiB page.
            unsafe { kernel_write64(pd + 8 * i2, a | UC) };
        }
        a += MIB2;
    }
    flush_tlb();
    true
}
