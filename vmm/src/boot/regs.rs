//! The boot vCPU's register state for each entry protocol.

use hypervisor::{SegmentRegister, SpecialRegisters, StandardRegisters, Vcpu};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::EntryPoint;
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};
use crate::memory::GuestMemoryMmap;

/// Errors from setting the boot registers.
#[derive(Debug, Error)]
pub enum RegsError {
    /// Writing the GDT or page tables failed.
    #[error("cannot write boot tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// A register write failed.
    #[error("cannot set boot registers")]
    Vcpu(#[source] hypervisor::CpuError),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT entries: null, 64-bit code, data, TSS, 32-bit code (selectors 0x08, 0x10, 0x18, 0x20).
const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 64-bit code
    0x00cf_9300_0000_ffff, // data
    0x0080_8b00_0000_0000, // TSS
    0x00cf_9b00_0000_ffff, // 32-bit code
];

/// A segment register as the descriptor `GDT[index]` loads it.
fn segment(index: u16) -> SegmentRegister {
    let d = GDT[index as usize];
    let limit_raw = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = ((d >> 55) & 1) as u8;
    SegmentRegister {
        base: ((d >> 16) & 0xff_ffff) | (((d >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector: index * 8,
        type_: ((d >> 40) & 0xf) as u8,
        present: ((d >> 47) & 1) as u8,
        dpl: ((d >> 45) & 3) as u8,
        db: ((d >> 54) & 1) as u8,
        s: ((d >> 44) & 1) as u8,
        l: ((d >> 53) & 1) as u8,
        g,
        avl: ((d >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, d) in GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::Write)
}

/// Identity-maps the first 4 GiB with 2 MiB pages for the 64-bit Linux entry.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let w = |v: u64, at: u64| mem.write_obj(v, GuestAddress(at)).map_err(RegsError::Write);
    w(PDPTE_START | 0x3, PML4_START)?;
    for i in 0..4u64 {
        w((PDE_START + i * 0x1000) | 0x3, PDPTE_START + i * 8)?;
    }
    for i in 0..2048u64 {
        w((i << 21) | 0x83, PDE_START + i * 8)?;
    }
    Ok(())
}

/// Sets the boot vCPU's registers for `entry`.
pub fn setup_boot_vcpu(
    vcpu: &dyn Vcpu,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    write_gdt(mem)?;
    let mut sregs: SpecialRegisters = vcpu.sregs().map_err(RegsError::Vcpu)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.tr = segment(3);
    let mut regs = StandardRegisters {
        rflags: 0x2,
        ..Default::default()
    };
    let data = segment(2);
    for seg in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *seg = data;
    }
    match entry {
        EntryPoint::Pvh { entry, start_info } => {
            sregs.cs = segment(4);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = start_info.0;
        }
        EntryPoint::Linux64 { entry, zero_page } => {
            write_page_tables(mem)?;
            sregs.cs = segment(1);
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsi = zero_page.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::Vcpu)?;
    vcpu.set_regs(&regs).map_err(RegsError::Vcpu)?;
    vcpu.setup_lint().map_err(RegsError::Vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_their_descriptors() {
        let c64 = segment(1);
        assert_eq!(
            (c64.selector, c64.type_, c64.l, c64.db, c64.present),
            (8, 0xb, 1, 0, 1)
        );
        let c32 = segment(4);
        assert_eq!(
            (c32.selector, c32.l, c32.db, c32.limit),
            (0x20, 0, 1, 0xffff_ffff)
        );
        let data = segment(2);
        assert_eq!(
            (data.type_, data.s, data.limit, data.base),
            (3, 1, 0xffff_ffff, 0)
        );
        let tss = segment(3);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
    }
}
