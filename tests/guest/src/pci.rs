//! PCI configuration access (legacy conf1 ports 0xCF8/0xCFC, or a PCIe ECAM window), bus-0 scan,
//! capability walk and BAR sizing/assignment.
//!
//! BARs that read back 0 (no firmware ran, e.g. QEMU microvm) are assigned from the 32-bit MMIO
//! window `0xC000_0000..0xE000_0000`; BARs that already hold an address (our VMM pre-assigns)
//! are kept. Every BAR used is mapped uncached (`paging::map_mmio`).

use crate::kernel::{
    inb, inl, inw, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, outl, outw,
};

/// How configuration space is reached.
#[derive(Clone, Copy)]
pub enum Access {
    /// Ports 0xCF8/0xCFC.
    Conf1,
    /// Memory-mapped ECAM at this base.
    Ecam(u64),
}

/// A function on bus 0.
#[derive(Clone, Copy)]
pub struct Device {
    access: Access,
    /// Device number.
    pub dev: u8,
    /// Function number.
    pub func: u8,
}

/// Start of the window for unassigned 32-bit BARs (QEMU microvm with pcie=on).
const WINDOW_START: u64 = 0xc000_0000;
/// End of that window.
const WINDOW_END: u64 = 0xe000_0000;
static mut NEXT_BAR: u64 = WINDOW_START;

impl Device {
    fn conf1_addr(&self, off: u16) -> u32 {
        0x8000_0000 | (self.dev as u32) << 11 | (self.func as u32) << 8 | (off as u32 & 0xfc)
    }

    fn ecam_addr(base: u64, dev: u8, func: u8, off: u16) -> u64 {
        base + ((dev as u64) << 15 | (func as u64) << 12 | off as u64)
    }

    /// Reads a dword (offset aligned down to 4).
    pub fn read32(&self, off: u16) -> u32 {
        match self.access {
            Access::Conf1 => {
                outl(0xcf8, self.conf1_addr(off));
                inl(0xcfc)
            }
            // SAFETY: the ECAM window is mapped uncached.
            Access::Ecam(b) => unsafe {
                mmio_read32(Self::ecam_addr(b, self.dev, self.func, off & !3))
            },
        }
    }

    /// Reads a word.
    pub fn read16(&self, off: u16) -> u16 {
        match self.access {
            Access::Conf1 => {
                outl(0xcf8, self.conf1_addr(off));
                inw(0xcfc + (off & 2))
            }
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe {
                mmio_read16(Self::ecam_addr(b, self.dev, self.func, off & !1))
            },
        }
    }

    /// Reads a byte.
    pub fn read8(&self, off: u16) -> u8 {
        match self.access {
            Access::Conf1 => {
                outl(0xcf8, self.conf1_addr(off));
                inb(0xcfc + (off & 3))
            }
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe { mmio_read8(Self::ecam_addr(b, self.dev, self.func, off)) },
        }
    }

    /// Writes a dword.
    pub fn write32(&self, off: u16, v: u32) {
        match self.access {
            Access::Conf1 => {
                outl(0xcf8, self.conf1_addr(off));
                outl(0xcfc, v)
            }
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe {
                mmio_write32(Self::ecam_addr(b, self.dev, self.func, off & !3), v)
            },
        }
    }

    /// Writes a word.
    pub fn write16(&self, off: u16, v: u16) {
        match self.access {
            Access::Conf1 => {
                outl(0xcf8, self.conf1_addr(off));
                outw(0xcfc + (off & 2), v)
            }
            // SAFETY: as read32.
            Access::Ecam(b) => unsafe {
                mmio_write16(Self::ecam_addr(b, self.dev, self.func, off & !1), v)
            },
        }
    }

    /// Vendor and device ID.
    pub fn ids(&self) -> (u16, u16) {
        let v = self.read32(0);
        (v as u16, (v >> 16) as u16)
    }

    /// Calls `f(offset, cap_id)` for every capability in the list.
    pub fn for_each_cap(&self, mut f: impl FnMut(u16, u8)) {
        if self.read16(6) & 0x10 == 0 {
            return;
        }
        let mut p = self.read8(0x34) as u16 & 0xfc;
        let mut n = 0;
        while p >= 0x40 && n < 48 {
            f(p, self.read8(p));
            p = self.read8(p + 1) as u16 & 0xfc;
            n += 1;
        }
    }

    /// Address of memory BAR `i` (assigned if needed, then mapped); None for I/O or absent BARs.
    pub fn bar(&self, i: u8) -> Option<u64> {
        if i > 5 {
            return None;
        }
        let off = 0x10 + 4 * i as u16;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None;
        }
        let is64 = (lo >> 1) & 3 == 2;
        let hi = if is64 && i < 5 {
            self.read32(off + 4)
        } else {
            0
        };
        // size it (memory decoding off meanwhile)
        let cmd = self.read16(4);
        self.write16(4, cmd & !2);
        self.write32(off, 0xffff_ffff);
        let mut mask = (self.read32(off) & !0xf) as u64;
        if is64 {
            self.write32(off + 4, 0xffff_ffff);
            mask |= (self.read32(off + 4) as u64) << 32;
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        self.write32(off, lo);
        if is64 {
            self.write32(off + 4, hi);
        }
        let size = (!mask).wrapping_add(1);
        let mut addr = ((hi as u64) << 32) | (lo & !0xf) as u64;
        if mask == 0xffff_ffff_0000_0000 || size == 0 {
            self.write16(4, cmd);
            return None;
        }
        if addr == 0 {
            // SAFETY: BSP-only bump allocator.
            unsafe {
                let a = (NEXT_BAR + size - 1) & !(size - 1);
                if a + size > WINDOW_END {
                    self.write16(4, cmd);
                    return None;
                }
                NEXT_BAR = a + size;
                addr = a;
            }
            self.write32(off, addr as u32 | (lo & 0xf));
            if is64 {
                self.write32(off + 4, (addr >> 32) as u32);
            }
        }
        self.write16(4, cmd);
        if !crate::paging::map_mmio(addr, size) {
            return None;
        }
        Some(addr)
    }
}

/// Scans bus 0 for a function with `vendor` and one of `devices`.
pub fn find(access: Access, vendor: u16, devices: &[u16]) -> Option<Device> {
    for dev in 0..32u8 {
        let d0 = Device {
            access,
            dev,
            func: 0,
        };
        let (v, _) = d0.ids();
        if v == 0xffff || v == 0 {
            continue;
        }
        let funcs = if d0.read8(0x0e) & 0x80 != 0 { 8 } else { 1 };
        for func in 0..funcs {
            let d = Device { access, dev, func };
            let (v, id) = d.ids();
            if v == vendor && devices.contains(&id) {
                return Some(d);
            }
        }
    }
    None
}
