//! One dirty-log sync: what the guest wrote (KVM's dirty ring or bitmap, whichever the VM has)
//! and what the VMM wrote itself (the guest memory's [`virtio_devices::WriteBitmap`]), reported
//! into a round.
//!
//! With the ring, a sync costs in proportion to the pages written. With the bitmap log it reads
//! KVM's bitmap into buffers kept from sync to sync (no fresh allocation per sync), and the
//! kernel re-arms only the 1 GiB chunks that have dirty pages (hypervisor's `dirty_bitmap.rs`).

use hypervisor::DirtyLogKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::DirtySink;

use super::MigrationError;
use crate::vm::{Vm, VmError};

/// Reads dirty pages since the previous sync; keeps the bitmap buffers between syncs.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    /// KVM bitmap per RAM region (bitmap log only), reused by every sync.
    buffers: Vec<Vec<u64>>,
    /// Page numbers per RAM region, reused by every sync.
    pages: Vec<Vec<u64>>,
}

impl DirtyTracker {
    /// A tracker for `vm`'s RAM regions.
    pub fn new(vm: &Vm) -> Self {
        let ring = vm.hypervisor_vm().dirty_log_kind() == DirtyLogKind::Ring;
        let regions = vm.memory().num_regions();
        let buffers = vm
            .memory()
            .iter()
            .map(|r| {
                let words = r.len().div_ceil(4096).div_ceil(64);
                if ring {
                    Vec::new()
                } else {
                    vec![0u64; usize::try_from(words).unwrap_or(0)]
                }
            })
            .collect();
        DirtyTracker {
            buffers,
            pages: vec![Vec::new(); regions],
        }
    }

    /// `ring` or `bitmap`: how KVM reports the guest's writes to this VM.
    pub fn kind_name(vm: &Vm) -> &'static str {
        match vm.hypervisor_vm().dirty_log_kind() {
            DirtyLogKind::Ring => "ring",
            DirtyLogKind::Bitmap => "bitmap",
        }
    }

    /// Reports every page written since the last sync (by the guest or the VMM) into `sink`,
    /// and re-arms dirty tracking for them. RAM region `i` is KVM slot `i`.
    pub fn sync(&mut self, vm: &Vm, sink: &mut dyn DirtySink) -> Result<(), MigrationError> {
        self.collect(vm, sink, true)
    }

    /// As [`DirtyTracker::sync`], for the last sync of a paused guest: KVM's bitmap is read but
    /// not re-armed (dirty logging stops after it), which saves a scan and the kernel's
    /// re-protection while the guest waits.
    pub fn final_sync(&mut self, vm: &Vm, sink: &mut dyn DirtySink) -> Result<(), MigrationError> {
        self.collect(vm, sink, false)
    }

    fn collect(
        &mut self,
        vm: &Vm,
        sink: &mut dyn DirtySink,
        rearm: bool,
    ) -> Result<(), MigrationError> {
        let hv = vm.hypervisor_vm();
        for pages in &mut self.pages {
            pages.clear();
        }
        match hv.dirty_log_kind() {
            DirtyLogKind::Ring => {
                let harvested = hv
                    .harvest_dirty_pages()
                    .map_err(|e| MigrationError::Vm(VmError::Hypervisor(e)))?;
                for p in harvested {
                    // A slot that is not RAM would be a KVM bug; its pages cannot be sent.
                    if let Some(list) = self.pages.get_mut(p.slot as usize) {
                        list.push(p.page);
                    }
                }
            }
            DirtyLogKind::Bitmap => {
                for (slot, buffer) in self.buffers.iter_mut().enumerate() {
                    let read = if rearm {
                        hv.sync_dirty_bitmap(slot as u32, buffer)
                    } else {
                        hv.read_dirty_bitmap(slot as u32, buffer)
                    };
                    read.map_err(|e| MigrationError::Vm(VmError::Hypervisor(e)))?;
                    sink.add_log(slot, buffer).map_err(MigrationError::Round)?;
                }
            }
        }
        for (index, region) in vm.memory().iter().enumerate() {
            let Some(list) = self.pages.get_mut(index) else {
                continue;
            };
            region.get_mmap().bitmap().take(|first, mut bits| {
                while bits != 0 {
                    list.push(first + u64::from(bits.trailing_zeros()));
                    bits &= bits - 1;
                }
            });
            if !list.is_empty() {
                sink.add_pages(index, list).map_err(MigrationError::Round)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hypervisor::KvmHypervisor;
    use vm_memory::{Bytes, GuestAddress};
    use vm_migration::{DirtyRound, LastRound, MemoryRange, MemoryRangeTable, RamRegions};

    use super::*;
    use crate::config::VmConfig;
    use crate::seccomp::SeccompMode;

    /// The VMM's own writes to guest memory reach a live round and the last round through
    /// the tracker, each once, whichever dirty log KVM gives this VM.
    #[test]
    fn vmm_writes_reach_live_and_last_rounds_once() {
        let mut config = VmConfig::default();
        config.memory.size = 64 << 20;
        let hv = KvmHypervisor::new().expect("/dev/kvm must be usable for this test");
        let vm =
            Vm::new_with_seccomp(config, &hv, Arc::new(|_| {}), SeccompMode::Disabled).unwrap();
        vm.start_dirty_log().unwrap();
        let ram = RamRegions::from_guest_memory(vm.memory().as_ref()).unwrap();
        let mut tracker = DirtyTracker::new(&vm);

        vm.memory().write_obj(7u64, GuestAddress(0x5008)).unwrap();
        let mut round = DirtyRound::new(&ram);
        tracker.sync(&vm, &mut round).unwrap();
        assert_eq!(
            round.into_table().unwrap().ranges(),
            &[MemoryRange::new(0x5000, 4096)]
        );
        let mut round = DirtyRound::new(&ram);
        tracker.sync(&vm, &mut round).unwrap();
        assert_eq!(round.dirty_pages(), 0, "taken by the first sync");

        vm.memory().write_obj(7u64, GuestAddress(0x9000)).unwrap();
        let before = MemoryRangeTable::from_ranges([MemoryRange::new(0x1000, 4096)]).unwrap();
        let mut last = LastRound::new(&ram, before);
        tracker.sync(&vm, &mut last).unwrap();
        assert_eq!(
            last.into_table().unwrap().ranges(),
            &[
                MemoryRange::new(0x1000, 4096),
                MemoryRange::new(0x9000, 4096)
            ]
        );
    }
}
