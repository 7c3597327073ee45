//! The 64-bit Linux boot protocol's zero page (`boot_params`) for bzImage kernels.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::e820::memory_map;
use super::BootError;
use crate::layout::{CMDLINE_START, ZERO_PAGE_START};
use crate::memory::GuestMemoryMmap;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

/// Fills and writes the zero page (with the ACPI RSDP at `rsdp`); returns its address.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: setup_header,
    cmdline_size: u32,
    initramfs: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<GuestAddress, BootError> {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    params.acpi_rsdp_addr = rsdp.raw_value();
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let ram: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    let map = memory_map(&ram);
    let n = map.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = n as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::Write)?;
    Ok(GuestAddress(ZERO_PAGE_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::memory::create_guest_memory;

    #[test]
    fn zero_page_fields() {
        let mem = create_guest_memory(&MemoryConfig {
            size: 256 << 20,
            shared: false,
            prefault: false,
            thp: false,
        })
        .unwrap();
        let at = write_zero_page(
            &mem,
            setup_header::default(),
            42,
            Some((0x800_0000, 0x1000)),
            GuestAddress(0xe_0000),
        )
        .unwrap();
        let p: boot_params = mem.read_obj(at).unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        // acpi_rsdp_addr sits at offset 0x70 of the zero page.
        let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x70)).unwrap();
        assert_eq!(rsdp, 0xe_0000);
        assert_eq!({ p.e820_table[2].addr }, 0x10_0000);
        // The zero page's e820 table sits at offset 0x2d0 as the boot protocol says.
        let raw: u64 = mem
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x2d0 + 2 * 20))
            .unwrap();
        assert_eq!(raw, 0x10_0000);
    }
}
