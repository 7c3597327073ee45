//! The PVH boot protocol's `hvm_start_info`, module list and memory map.

use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::e820::memory_map;
use super::BootError;
use crate::layout::{
    CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use crate::memory::GuestMemoryMmap;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Writes `hvm_start_info` (with the ACPI RSDP at `rsdp`), the memory map and the module list;
/// returns the start info address.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    initramfs: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    let ram: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    let map = memory_map(&ram);
    let entries = map.len().min(PVH_MEMMAP_MAX_ENTRIES);
    for (i, e) in map.iter().take(entries).enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(PVH_MEMMAP_START + 24 * i as u64))
            .map_err(BootError::Write)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: entries as u32,
        rsdp_paddr: rsdp.raw_value(),
        ..Default::default()
    };
    if let Some((addr, size)) = initramfs {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::Write)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::Write)?;
    Ok(GuestAddress(PVH_INFO_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::memory::create_guest_memory;

    #[test]
    fn start_info_layout_matches_the_pvh_abi() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 4 << 30,
            shared: false,
            prefault: false,
            thp: false,
        })
        .unwrap();
        let at =
            write_start_info(&mem, Some((0x200_0000, 0x1234)), GuestAddress(0xe_0000)).unwrap();
        let rd32 = |off: u64| mem.read_obj::<u32>(at.unchecked_add(off)).unwrap();
        let rd64 = |off: u64| mem.read_obj::<u64>(at.unchecked_add(off)).unwrap();
        // Offsets from the PVH ABI (xen/include/public/arch-x86/hvm/start_info.h).
        assert_eq!(rd32(0), XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(rd32(4), 1);
        assert_eq!(rd32(12), 1, "nr_modules");
        assert_eq!(rd64(16), PVH_MODLIST_START);
        assert_eq!(rd64(24), CMDLINE_START);
        assert_eq!(rd64(32), 0xe_0000, "rsdp_paddr");
        assert_eq!(rd64(40), PVH_MEMMAP_START);
        assert_eq!(
            rd32(48),
            4,
            "memmap entries: low, reserved BIOS area, high, above 4G"
        );
        let last = PVH_MEMMAP_START + 3 * 24;
        assert_eq!(mem.read_obj::<u64>(GuestAddress(last)).unwrap(), 4 << 30);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(last + 8)).unwrap(),
            1 << 30
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(last + 16)).unwrap(), 1);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PVH_MODLIST_START))
                .unwrap(),
            0x200_0000
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PVH_MODLIST_START + 8))
                .unwrap(),
            0x1234
        );
    }
}
