//! The guest-physical address map.
//!
//! ```text
//! 0x0000_0000  real-mode area: GDT (0x500), boot page tables (0x9000..), hvm_start_info and memory
//!              map (0x6000..), boot_params zero page (0x7000), kernel command line (0x20000)
//! 0x0009_fc00  end of low RAM (reserved: EBDA)
//! 0x000e_0000  BIOS area (reserved): ACPI RSDP and tables
//! 0x000f_0000  MP table
//! 0x0010_0000  kernel image (PVH ELF or bzImage protected-mode part), then RAM
//! low RAM end  = min(RAM size, 3 GiB)
//! 0xc000_0000  32-bit PCI MMIO window (BARs), 512 MiB
//! 0xe000_0000  PCI ECAM (reserved, not yet decoded)
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 local APIC
//! 0x1_0000_0000 RAM above 4 GiB: the rest of guest RAM
//! ```
//!
//! I/O ports of the platform (besides the legacy PC devices, COM1 and PCI conf1 at 0xCF8):
//! 0x600-0x602 the ACPI sleep control, sleep status and reset registers; 0x1000-0xFFFF the
//! PCI I/O window.

/// Where the boot GDT goes.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the boot IDT goes (empty; 64-bit kernels load their own).
pub const BOOT_IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Most PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6100) / 24;
/// The Linux boot protocol's zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables for the 64-bit bzImage entry: PML4, PDPT, then PDs.
pub const PML4_START: u64 = 0x9000;
/// Boot PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Boot page directories (4 of them: the first 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// End of conventional low memory (640 KiB less the EBDA's last KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the BIOS area the memory map reserves (up to 1 MiB): ACPI tables and MP table.
pub const BIOS_AREA_START: u64 = 0xe0000;
/// The ACPI RSDP, followed by the other ACPI tables (guests scan 0xE0000-0xFFFFF for it).
pub const ACPI_START: u64 = 0xe0000;
/// Room for the ACPI tables: up to the MP table.
pub const ACPI_SIZE: u64 = MPTABLE_START - ACPI_START;
/// The MP table.
pub const MPTABLE_START: u64 = 0xf0000;
/// Start of the high memory where kernels load.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole; RAM below 4 GiB ends here at the latest.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Size of the hole below 4 GiB.
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
/// The 32-bit PCI MMIO window used for BARs.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// Where RAM above the hole starts.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// The ACPI sleep control register (hardware-reduced ACPI): SLP_TYP and SLP_EN.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// The ACPI sleep status register (WAK_STS).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// The ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x602;
/// First port of the PCI I/O window (above every legacy port).
pub const PCI_IO_WINDOW_START: u16 = 0x1000;
/// Last port of the PCI I/O window.
pub const PCI_IO_WINDOW_END: u16 = 0xffff;
