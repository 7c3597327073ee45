//! Reads the PVH `hvm_start_info`: the E820-style memory map, the command line and the ACPI
//! RSDP address. Everything is copied out, so the low memory it lived in may be reused.

/// `hvm_start_info.magic`.
const MAGIC: u32 = 0x336e_c578;
/// Maximum memory map entries kept.
pub const MAX_ENTRIES: usize = 64;
/// Maximum command line length kept.
pub const MAX_CMDLINE: usize = 2048;
/// Memory map type of usable RAM.
pub const E820_RAM: u32 = 1;
/// Highest address the boot map (GiB 0) lets us read before `paging::map_all`.
const BOOT_MAPPED: u64 = 1 << 30;

/// One memory map entry.
#[derive(Clone, Copy, Default, Debug)]
pub struct Region {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

impl Region {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// What the guest keeps from `hvm_start_info`.
pub struct BootInfo {
    /// Memory map entries as given.
    pub map: [Region; MAX_ENTRIES],
    /// Valid entries in `map`.
    pub entries: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// ACPI RSDP physical address (0 if not given).
    pub rsdp: u64,
}

/// Why the start info could not be used.
pub enum Error {
    /// Wrong magic.
    BadMagic(u32),
    /// Memory map missing or empty.
    NoMemmap,
    /// A structure lies outside the boot mapping.
    Unmapped(u64),
}

fn rd32(a: u64) -> u32 {
    // SAFETY: callers check that `a` is inside the boot identity map.
    unsafe { core::ptr::read_volatile(a as *const u32) }
}

fn rd64(a: u64) -> u64 {
    // SAFETY: as rd32.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

impl BootInfo {
    /// Parses the structure at `si`.
    pub fn parse(si: u64) -> Result<BootInfo, Error> {
        if si == 0 || si + 56 > BOOT_MAPPED {
            return Err(Error::Unmapped(si));
        }
        let magic = rd32(si);
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = rd32(si + 4);
        let cmdline_pa = rd64(si + 24);
        let rsdp = rd64(si + 32);
        let (memmap, n) = if version >= 1 {
            (rd64(si + 40), rd32(si + 48) as usize)
        } else {
            (0, 0)
        };
        if memmap == 0 || n == 0 {
            return Err(Error::NoMemmap);
        }
        let n = n.min(MAX_ENTRIES);
        if memmap + 24 * n as u64 > BOOT_MAPPED {
            return Err(Error::Unmapped(memmap));
        }
        let mut bi = BootInfo {
            map: [Region::default(); MAX_ENTRIES],
            entries: n,
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp,
        };
        for i in 0..n {
            let e = memmap + 24 * i as u64;
            bi.map[i] = Region {
                addr: rd64(e),
                size: rd64(e + 8),
                kind: rd32(e + 16),
            };
        }
        if cmdline_pa != 0 && cmdline_pa + MAX_CMDLINE as u64 <= BOOT_MAPPED {
            while bi.cmdline_len < MAX_CMDLINE - 1 {
                // SAFETY: inside the boot map (checked above).
                let b = unsafe {
                    core::ptr::read_volatile((cmdline_pa + bi.cmdline_len as u64) as *const u8)
                };
                if b == 0 {
                    break;
                }
                bi.cmdline[bi.cmdline_len] = b;
                bi.cmdline_len += 1;
            }
        }
        Ok(bi)
    }

    /// The command line (non-UTF-8 bytes make it empty).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// RAM regions (type 1), clipped to whole pages.
    pub fn ram(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map[..self.entries]
            .iter()
            .filter(|r| r.kind == E820_RAM)
            .map(|r| ((r.addr + 0xfff) & !0xfff, r.end() & !0xfff))
            .filter(|(s, e)| e > s)
    }

    /// One past the highest RAM byte.
    pub fn ram_end(&self) -> u64 {
        self.ram().map(|(_, e)| e).max().unwrap_or(0)
    }

    /// Total RAM bytes.
    pub fn ram_bytes(&self) -> u64 {
        self.ram().map(|(s, e)| e - s).sum()
    }

    /// Does `[a, b)` overlap RAM?
    pub fn overlaps_ram(&self, a: u64, b: u64) -> bool {
        self.ram().any(|(s, e)| s < b && a < e)
    }

    /// Is `[a, b)` entirely inside one RAM region?
    pub fn is_ram(&self, a: u64, b: u64) -> bool {
        self.ram().any(|(s, e)| s <= a && b <= e)
    }
}
