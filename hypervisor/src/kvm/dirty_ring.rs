//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): instead of one bitmap per memory slot, every
//! vCPU pushes the pages it writes into a ring shared with the VMM, so collecting them costs in
//! proportion to the pages written, not to the size of guest RAM.
//!
//! ```text
//!  vCPU writes page ──► KVM pushes {slot, offset, DIRTY} into that vCPU's ring, write-protects
//!  harvest (any thread, one at a time):
//!     for each ring, from where the last harvest stopped:
//!         entry DIRTY? ── no ──► next ring
//!            │ yes
//!            ▼
//!         record (slot, offset), mark the entry RESET
//!     KVM_RESET_DIRTY_RINGS ──► KVM re-protects the RESET entries' pages and frees them
//!  ring nearly full ──► KVM_RUN returns KVM_EXIT_DIRTY_RING_FULL; the vCPU harvests, runs again
//! ```
//! The ring must be enabled before the first vCPU is created; without the capability the VM
//! keeps the bitmap log.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use kvm_bindings::kvm_dirty_gfn;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

use crate::vm::DirtyPage;

const KVMIO: u32 = 0xAE;
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry flag: KVM wrote this entry and the VMM has not collected it yet.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// Entry flag: the VMM collected this entry; KVM may re-protect the page and reuse the entry.
const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// Pages per ring the VMM asks for (16 bytes each: 1 MiB per vCPU), capped by what KVM allows.
pub(crate) const WANTED_RING_ENTRIES: u32 = 65536;

/// Ring size in bytes to enable for `entries` pages, given KVM's answer to the capability check
/// (the maximum size in bytes, or 0 when there is no ring). A power of two of at least one
/// page, or `None`.
pub(crate) fn ring_bytes(max_bytes: i32, entries: u32) -> Option<u32> {
    let entry = std::mem::size_of::<kvm_dirty_gfn>() as u32;
    let max = u32::try_from(max_bytes).ok()?;
    let wanted = entries.checked_next_power_of_two()?.checked_mul(entry)?;
    let bytes = if max >= wanted {
        wanted
    } else {
        // The largest power of two not above the maximum.
        1u32 << max.checked_ilog2()?
    };
    (bytes >= 4096).then_some(bytes)
}

/// One vCPU's ring, mapped from its file descriptor.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// The next entry to look at (counts up forever; the slot is `fetch % count`).
    fetch: u32,
}

// SAFETY: the mapping is shared memory owned by this `Ring` until it is dropped; every access to
// it goes through `DirtyRings`' mutex or atomics on the flags word.
unsafe impl Send for Ring {}

impl Ring {
    /// Moves the DIRTY entries starting at `fetch` into `out`, marking each RESET; returns
    /// how many.
    fn collect(&mut self, out: &mut Vec<DirtyPage>) -> u32 {
        let mut collected = 0;
        while collected < self.count {
            let index = (self.fetch % self.count) as usize;
            // SAFETY: `index < count`, the number of entries in the mapping, which lives as long
            // as `self`.
            let entry = unsafe { self.entries.add(index) };
            // SAFETY: `flags` is the entry's first field, a naturally aligned u32 that KVM
            // publishes with a release store (the entry is complete once DIRTY is seen).
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*entry).flags)) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is DIRTY, so KVM wrote it completely and leaves it alone until
            // the VMM marks it RESET and resets the rings.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            out.push(DirtyPage {
                slot: slot & 0xffff,
                page: offset,
            });
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            collected += 1;
        }
        collected
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping made in `DirtyRings::map_vcpu`, used by no one
        // else any more.
        unsafe { libc::munmap(self.entries.cast(), len) };
    }
}

struct Harvest {
    rings: Vec<Ring>,
    /// Pages collected (by a vCPU whose ring filled up) and not yet taken by `harvest`.
    pending: Vec<DirtyPage>,
}

/// Every vCPU ring of one VM and the pages collected from them.
pub(crate) struct DirtyRings {
    /// A duplicate of the VM file descriptor, for KVM_RESET_DIRTY_RINGS from any thread.
    vm_fd: OwnedFd,
    ring_bytes: u32,
    state: Mutex<Harvest>,
}

impl DirtyRings {
    pub(crate) fn new(vm_fd: OwnedFd, ring_bytes: u32) -> Self {
        DirtyRings {
            vm_fd,
            ring_bytes,
            state: Mutex::new(Harvest {
                rings: Vec::new(),
                pending: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Harvest> {
        // The state stays consistent whatever a panicking holder was doing: keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps the ring of a freshly created vCPU.
    pub(crate) fn map_vcpu(&self, vcpu_fd: &impl AsRawFd) -> std::io::Result<()> {
        let page = 4096i64;
        let offset = i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a new shared mapping of the vCPU's ring area, `ring_bytes` long as enabled on
        // the VM; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                self.ring_bytes as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let count = self.ring_bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32;
        self.lock().rings.push(Ring {
            entries: p.cast(),
            count,
            fetch: 0,
        });
        Ok(())
    }

    /// Collects the DIRTY entries of every ring into the pending list and lets KVM re-protect
    /// their pages. Called by a vCPU whose ring is full, and by [`DirtyRings::harvest`].
    pub(crate) fn collect(&self) -> std::io::Result<()> {
        let mut state = self.lock();
        let Harvest { rings, pending } = &mut *state;
        let mut collected = 0u32;
        for ring in rings.iter_mut() {
            collected = collected.saturating_add(ring.collect(pending));
        }
        if collected > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument; `vm_fd` is a VM descriptor.
            let ret = unsafe { ioctl(&self.vm_fd, KVM_RESET_DIRTY_RINGS()) };
            if ret < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Every page written since the last harvest (a page may appear more than once).
    pub(crate) fn harvest(&self) -> std::io::Result<Vec<DirtyPage>> {
        self.collect()?;
        Ok(std::mem::take(&mut self.lock().pending))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::kvm::tests::{boot_counter, vm_from, Mem, CODE};
    use crate::{DirtyLogKind, KvmHypervisor, Vcpu, VmExit};

    const MEM: usize = 8 << 20;
    /// The guest writes one byte to each page from 64 KiB to the end of its 8 MiB, then counts
    /// in EAX and reports it on port 0x80, and starts over. Between two pages it spins 100 times:
    /// kvm_pvm emulates this (ring 0) code in batches of up to 1024 instructions and checks
    /// for a full ring only between batches, so a batch must not dirty more pages than the
    /// ring keeps in reserve (64); with a denser writer KVM overwrites entries nobody has
    /// collected (its "ring full" warning), which is why the VMM does not use the ring on
    /// kvm_pvm (see `dirty_ring_is_reliable`). Natively running guest code exits on every such write.
    /// `l0: mov ebx, 0x10000; l1: mov [ebx], al; mov ecx, 100; l2: dec ecx; jnz l2;`
    /// `add ebx, 0x1000; cmp ebx, 0x800000; jb l1; inc eax; out 0x80, al; jmp l0`.
    const PAGE_WRITER: [u8; 34] = [
        0xbb, 0x00, 0x00, 0x01, 0x00, // mov ebx, 0x10000
        0x88, 0x03, // l1: mov [ebx], al
        0xb9, 0x64, 0x00, 0x00, 0x00, // mov ecx, 100
        0x49, 0x75, 0xfd, // l2: dec ecx; jnz l2
        0x81, 0xc3, 0x00, 0x10, 0x00, 0x00, // add ebx, 0x1000
        0x81, 0xfb, 0x00, 0x00, 0x80, 0x00, // cmp ebx, 0x800000
        0x72, 0xe8, // jb l1
        0x40, 0xe6, 0x80, // inc eax; out 0x80, al
        0xeb, 0xde, // jmp l0
    ];
    const FIRST_PAGE: u64 = 0x10;
    const PAGES: u64 = (MEM / 4096) as u64;

    /// Guest memory holding the page writer at CODE.
    fn writer_memory() -> Mem {
        let mut mem = Mem::of_size(MEM);
        mem.bytes()[CODE as usize..CODE as usize + PAGE_WRITER.len()].copy_from_slice(&PAGE_WRITER);
        mem
    }

    /// Runs one pass of the page writer; returns how many ring-full exits it took.
    fn one_pass(vcpu: &mut dyn Vcpu) -> u32 {
        let mut full = 0;
        loop {
            match vcpu.run().unwrap() {
                VmExit::IoOut(0x80, _) => return full,
                VmExit::DirtyRingFull => full += 1,
                VmExit::Interrupted => {}
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    fn pages(harvest: &[DirtyPage]) -> BTreeSet<u64> {
        assert!(harvest.iter().all(|p| p.slot == 0));
        harvest.iter().map(|p| p.page).collect()
    }

    fn ring_hypervisor(entries: u32) -> KvmHypervisor {
        let mut hv = KvmHypervisor::new().expect("/dev/kvm must be usable for these tests");
        hv.dirty_ring_entries = Some(entries);
        hv
    }

    /// Every page written shows up in the harvest after the write, and only then: a page
    /// written again after a harvest is in the next one, a page not written again is not.
    #[test]
    fn harvest_sees_each_write_once_per_round() {
        let mem = writer_memory();
        let vm = vm_from(&ring_hypervisor(WANTED_RING_ENTRIES), mem.host(), MEM, true);
        assert_eq!(
            vm.dirty_log_kind(),
            DirtyLogKind::Ring,
            "this host has the ring"
        );
        let mut vcpu = vm.create_vcpu(0).unwrap();
        boot_counter(vcpu.as_ref());
        let written: BTreeSet<u64> = (FIRST_PAGE..PAGES).collect();
        for round in 0..3 {
            assert_eq!(one_pass(vcpu.as_mut()), 0, "a 64k ring holds one pass");
            let got = pages(&vm.harvest_dirty_pages().unwrap());
            assert_eq!(
                written.difference(&got).count(),
                0,
                "round {round}: pages missing"
            );
            // Nothing the guest did not write (its code page is only read).
            assert!(!got.contains(&(CODE / 4096)), "round {round}");
            assert_eq!(got.len(), written.len(), "round {round}");
            assert!(
                vm.harvest_dirty_pages().unwrap().is_empty(),
                "already collected"
            );
        }
        // The bitmap log is not there in ring mode.
        assert!(vm.get_dirty_log(0, MEM as u64).is_err());
    }

    /// With a ring far smaller than a pass, the vCPU exits with the ring full several times; the
    /// pages collected then are all in the next harvest, none lost.
    #[test]
    fn nothing_is_lost_when_the_ring_fills_up() {
        let mem = writer_memory();
        let vm = vm_from(&ring_hypervisor(512), mem.host(), MEM, true);
        let mut vcpu = vm.create_vcpu(0).unwrap();
        boot_counter(vcpu.as_ref());
        let written: BTreeSet<u64> = (FIRST_PAGE..PAGES).collect();
        for round in 0..2 {
            let full = one_pass(vcpu.as_mut());
            assert!(
                full >= 3,
                "round {round}: {full} ring-full exits for 2032 pages"
            );
            let got = pages(&vm.harvest_dirty_pages().unwrap());
            let missing = written.difference(&got).count();
            assert_eq!(missing, 0, "round {round}: pages lost");
            assert_eq!(
                got.len(),
                written.len(),
                "round {round}: pages never written"
            );
        }
    }

    /// Without the ring (turned off, or a kernel without it) the VM keeps the bitmap log.
    #[test]
    fn bitmap_log_when_the_ring_is_off() {
        let mem = writer_memory();
        let hv = KvmHypervisor::with_dirty_ring(false).unwrap();
        let vm = vm_from(&hv, mem.host(), MEM, true);
        assert_eq!(vm.dirty_log_kind(), DirtyLogKind::Bitmap);
        assert!(matches!(
            vm.harvest_dirty_pages(),
            Err(crate::VmError::NoDirtyRing)
        ));
        let mut vcpu = vm.create_vcpu(0).unwrap();
        boot_counter(vcpu.as_ref());
        vm.get_dirty_log(0, MEM as u64).unwrap();
        assert_eq!(one_pass(vcpu.as_mut()), 0);
        let log = vm.get_dirty_log(0, MEM as u64).unwrap();
        let set: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
        assert!(set >= PAGES - FIRST_PAGE);
    }

    #[test]
    fn ring_size_is_a_power_of_two_within_the_maximum() {
        let wanted = WANTED_RING_ENTRIES;
        assert_eq!(ring_bytes(0, wanted), None);
        assert_eq!(ring_bytes(-1, wanted), None);
        assert_eq!(ring_bytes(1 << 20, wanted), Some(1 << 20));
        assert_eq!(ring_bytes(1 << 24, wanted), Some(1 << 20));
        assert_eq!(ring_bytes((1 << 16) + 5, wanted), Some(1 << 16));
        assert_eq!(ring_bytes(2048, wanted), None);
        assert_eq!(ring_bytes(1 << 20, 1000), Some(1024 * 16));
        assert_eq!(ring_bytes(1 << 20, 16), None, "less than a page");
    }
}
