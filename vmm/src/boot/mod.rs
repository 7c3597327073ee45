//! Loading a kernel and handing over to it: PVH ELF images (Linux vmlinux, the test guest) and
//! bzImages through the 64-bit Linux boot protocol.

pub mod acpi;
pub mod cpuid;
pub mod e820;
mod linux;
pub mod mptable;
mod pvh;
pub mod regs;

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::config::PayloadConfig;
use crate::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, MPTABLE_START};
use crate::memory::{low_ram_end, GuestMemoryMmap};

/// Errors from loading and configuring the boot payload.
#[derive(Debug, Error)]
pub enum BootError {
    /// No kernel was configured.
    #[error("no kernel given")]
    NoKernel,
    /// The kernel file could not be opened.
    #[error("cannot open kernel {0}")]
    OpenKernel(String, #[source] std::io::Error),
    /// The initramfs could not be read.
    #[error("cannot read initramfs {0}")]
    Initramfs(String, #[source] std::io::Error),
    /// The initramfs does not fit in low RAM above the kernel.
    #[error("initramfs of {0} bytes does not fit in guest RAM")]
    InitramfsTooLarge(u64),
    /// The kernel is an ELF without a PVH entry note.
    #[error("ELF kernel has no PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    /// The kernel is neither an ELF nor a bzImage, or is damaged.
    #[error("kernel is neither a PVH ELF nor a bzImage")]
    UnknownKernel(#[source] linux_loader::loader::Error),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing boot structures into guest memory failed.
    #[error("cannot write boot data into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
    /// Writing the MP table failed.
    #[error("cannot write the MP table")]
    Mptable(#[source] mptable::MptableError),
    /// Writing the ACPI tables failed.
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] acpi::AcpiError),
}

/// The machine the boot tables describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The VM has a serial port at COM1.
    pub com1: bool,
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `ebx` = the `hvm_start_info` address.
    Pvh {
        /// The PVH entry address.
        entry: GuestAddress,
        /// Where `hvm_start_info` was written.
        start_info: GuestAddress,
    },
    /// The 64-bit Linux boot protocol: long mode, identity-mapped, `rsi` = the zero page.
    Linux64 {
        /// The 64-bit entry (load address + 0x200).
        entry: GuestAddress,
        /// Where `boot_params` was written.
        zero_page: GuestAddress,
    },
}

/// Loads the payload into guest memory and writes everything the kernel reads at boot: the
/// command line, the initramfs, the memory map and RSDP address (PVH start info or zero page),
/// the MP table and the ACPI tables.
pub fn load_payload(
    mem: &GuestMemoryMmap,
    payload: &PayloadConfig,
    platform: Platform,
) -> Result<EntryPoint, BootError> {
    let kernel_path = payload.kernel.as_deref().ok_or(BootError::NoKernel)?;
    let mut kernel = File::open(kernel_path)
        .map_err(|e| BootError::OpenKernel(kernel_path.display().to_string(), e))?;

    let cmdline = build_cmdline(payload.cmdline.as_deref().unwrap_or(""))?;
    let cstr = cmdline.as_cstring().map_err(BootError::Cmdline)?;
    mem.write_slice(cstr.as_bytes_with_nul(), GuestAddress(CMDLINE_START))
        .map_err(BootError::Write)?;
    let cmdline_size = cstr.as_bytes().len() as u32;

    mptable::setup(mem, MPTABLE_START, platform.vcpus).map_err(BootError::Mptable)?;
    let rsdp = acpi::setup(
        mem,
        acpi::AcpiConfig {
            vcpus: platform.vcpus,
            com1: platform.com1,
        },
    )
    .map_err(BootError::Acpi)?;

    let high = Some(GuestAddress(HIGH_RAM_START));
    match Elf::load(mem, None, &mut kernel, high) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => entry,
                _ => return Err(BootError::NoPvhEntry),
            };
            let initramfs = load_initramfs(mem, payload.initramfs.as_deref(), result.kernel_end)?;
            let start_info = pvh::write_start_info(mem, initramfs, rsdp)?;
            Ok(EntryPoint::Pvh { entry, start_info })
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let result =
                BzImage::load(mem, None, &mut kernel, high).map_err(BootError::UnknownKernel)?;
            let header = result.setup_header.ok_or(BootError::UnknownKernel(
                linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                ),
            ))?;
            let initramfs = load_initramfs(mem, payload.initramfs.as_deref(), result.kernel_end)?;
            let zero_page = linux::write_zero_page(mem, header, cmdline_size, initramfs, rsdp)?;
            Ok(EntryPoint::Linux64 {
                entry: GuestAddress(result.kernel_load.0 + 0x200),
                zero_page,
            })
        }
        Err(e) => Err(BootError::UnknownKernel(e)),
    }
}

fn build_cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Loads the initramfs at the top of low RAM (page aligned) and returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: Option<&Path>,
    kernel_end: u64,
) -> Result<Option<(u64, u64)>, BootError> {
    let Some(path) = path else { return Ok(None) };
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::Initramfs(name.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Initramfs(name.clone(), e))?
        .len();
    let top = low_ram_end(mem);
    let addr = top
        .checked_sub(size)
        .ok_or(BootError::InitramfsTooLarge(size))?
        & !0xfff;
    if addr < kernel_end {
        return Err(BootError::InitramfsTooLarge(size));
    }
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge(size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(BootError::Write)?;
    Ok(Some((addr, size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    const ONE_CPU: Platform = Platform {
        vcpus: 1,
        com1: true,
    };

    fn mem() -> std::sync::Arc<GuestMemoryMmap> {
        create_guest_memory(&MemoryConfig {
            size: 128 << 20,
            shared: false,
            prefault: false,
            thp: false,
        })
        .unwrap()
    }

    fn payload_from(bytes: &[u8]) -> (tempfile_path::TempPath, PayloadConfig) {
        let path = tempfile_path::TempPath::new();
        std::fs::File::create(&path.0)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let p = PayloadConfig {
            kernel: Some(path.0.clone()),
            cmdline: Some("console=ttyS0".into()),
            initramfs: None,
        };
        (path, p)
    }

    /// A unique temporary file path removed on drop (no extra crate for one test helper).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                TempPath(
                    std::env::temp_dir().join(format!("vmm-boot-test-{}-{n}", std::process::id())),
                )
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn garbage_kernel_is_refused() {
        let (_p, payload) = payload_from(&[0x55; 8192]);
        assert!(matches!(
            load_payload(&mem(), &payload, ONE_CPU),
            Err(BootError::UnknownKernel(_))
        ));
    }

    #[test]
    fn missing_kernel_is_refused() {
        let payload = PayloadConfig {
            kernel: Some("/nonexistent/kernel".into()),
            cmdline: None,
            initramfs: None,
        };
        assert!(matches!(
            load_payload(&mem(), &payload, ONE_CPU),
            Err(BootError::OpenKernel(..))
        ));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem();
        let (_p, payload) = payload_from(&[0x55; 8192]);
        let _ = load_payload(&m, &payload, ONE_CPU);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }
}
