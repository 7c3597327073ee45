//! Guest RAM: its layout, how it is backed on the host, and its KVM memory slots.

use std::fs::File;
use std::sync::Arc;

use hypervisor::{UserMemoryRegion, Vm};
use thiserror::Error;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use crate::config::MemoryConfig;
use crate::layout::{MEM_32BIT_GAP_START, RAM_64BIT_START};

/// Guest memory with a write-tracking bitmap: writes the VMM makes through vm-memory are
/// recorded, so migration sees them alongside KVM's dirty log.
pub type GuestMemoryMmap = virtio_devices::GuestMemoryMmap;

/// Errors from setting up guest RAM.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The size does not fit this address map.
    #[error("memory size {0:#x} is not usable (must be a non-zero multiple of 4 KiB)")]
    InvalidSize(u64),
    /// memfd_create failed.
    #[error("cannot create a memfd for shared guest memory")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory file")]
    Truncate(#[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map guest memory")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions do not form a valid guest memory.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    /// Registering a slot with KVM failed.
    #[error("cannot register guest memory with KVM")]
    Slot(#[source] hypervisor::VmError),
}

/// The guest-physical ranges RAM of `size` bytes occupies: below the 32-bit hole, then from 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MEM_32BIT_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(RAM_64BIT_START), size - low));
    }
    ranges
}

/// Creates guest RAM as `config` asks: private anonymous memory, or a memfd when `shared`,
/// with transparent huge pages and prefaulting as requested. Nothing is touched unless
/// `prefault` is set, so the host's RSS grows only with what the guest uses.
pub fn create_guest_memory(config: &MemoryConfig) -> Result<Arc<GuestMemoryMmap>, MemoryError> {
    let size = config.size;
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(MemoryError::InvalidSize(size));
    }
    let file = if config.shared {
        Some(Arc::new(create_memfd(size)?))
    } else {
        None
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (addr, len) in ram_ranges(size) {
        let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize(size))?;
        let mapping = match &file {
            Some(f) => {
                MmapRegion::from_file(FileOffset::from_arc(f.clone(), file_offset), len_usize)
            }
            None => MmapRegion::new(len_usize),
        }
        .map_err(MemoryError::Mmap)?;
        advise(&mapping, config.thp, config.prefault);
        file_offset += len;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or(MemoryError::InvalidSize(size))?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
    Ok(Arc::new(mem))
}

/// Guest RAM mapped from files another VMM handed over (local migration): each region maps
/// `size` bytes at `offset` of its file, shared, at `gpa`.
pub fn guest_memory_from_files(
    regions: Vec<vm_migration::protocol::MemoryFdRegion<std::os::fd::OwnedFd>>,
    config: &MemoryConfig,
) -> Result<Arc<GuestMemoryMmap>, MemoryError> {
    let mut out = Vec::new();
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| MemoryError::InvalidSize(r.size))?;
        let file = File::from(r.fd);
        let mapping = MmapRegion::from_file(FileOffset::new(file, r.offset), size)
            .map_err(MemoryError::Mmap)?;
        advise(&mapping, config.thp, false);
        out.push(
            GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .ok_or(MemoryError::InvalidSize(r.size))?,
        );
    }
    let mem = GuestMemoryMmap::from_regions(out).map_err(MemoryError::Layout)?;
    Ok(Arc::new(mem))
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Truncate)?;
    Ok(file)
}

fn advise<B: vm_memory::bitmap::Bitmap>(mapping: &MmapRegion<B>, thp: bool, prefault: bool) {
    let (ptr, len) = (mapping.as_ptr() as *mut libc::c_void, mapping.size());
    if thp {
        // SAFETY: advice on a mapping this process owns; MADV_HUGEPAGE changes no contents.
        let r = unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        if r != 0 {
            log::debug!("MADV_HUGEPAGE refused: {}", std::io::Error::last_os_error());
        }
    }
    if prefault {
        // SAFETY: MADV_POPULATE_WRITE only faults in the pages of a mapping this process owns.
        let r = unsafe { libc::madvise(ptr, len, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            log::warn!(
                "prefaulting guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Advises transparent huge pages on all of guest RAM (after a migration has filled it: a
/// receiver that faulted in huge pages while data streamed in would stall on compaction).
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        advise(&region.get_mmap(), true, false);
    }
}

/// Registers every RAM region as a KVM memory slot (slot i = region i).
pub fn register_slots(
    vm: &dyn Vm,
    mem: &GuestMemoryMmap,
    log_dirty: bool,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| MemoryError::InvalidSize(region.len()))?;
        let r = UserMemoryRegion {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            log_dirty_pages: log_dirty,
        };
        // SAFETY: the mapping belongs to `mem`, which the VM object keeps alive (in an Arc) for as
        // long as the KVM VM exists.
        unsafe { vm.set_user_memory_region(r) }.map_err(MemoryError::Slot)?;
    }
    Ok(())
}

/// The end of RAM below 4 GiB.
pub fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.last_addr().raw_value() + 1)
        .filter(|&end| end <= MEM_32BIT_GAP_START)
        .max()
        .unwrap_or(0)
}

/// The total size of guest RAM.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_at_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 1 << 30)]
        );
        assert_eq!(ram_ranges(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
    }

    #[test]
    fn creates_private_and_shared_memory() {
        for shared in [false, true] {
            let cfg = MemoryConfig {
                size: 64 << 20,
                shared,
                prefault: false,
                thp: true,
            };
            let mem = create_guest_memory(&cfg).unwrap();
            assert_eq!(ram_size(&mem), 64 << 20);
            assert_eq!(low_ram_end(&mem), 64 << 20);
            let region = mem.iter().next().unwrap();
            assert_eq!(region.file_offset().is_some(), shared);
        }
    }

    #[test]
    fn rejects_unaligned_size() {
        let cfg = MemoryConfig {
            size: 4097,
            shared: false,
            prefault: false,
            thp: false,
        };
        assert!(matches!(
            create_guest_memory(&cfg),
            Err(MemoryError::InvalidSize(_))
        ));
    }
}
