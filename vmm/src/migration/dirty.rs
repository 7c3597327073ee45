//! One dirty-log sync: what the guest wrote (KVM's dirty ring or bitmap, whichever the VM has)
//! and what the VMM wrote itself (the guest memory's [`virtio_devices::WriteBitmap`]), reported
//! into a round.
//!
//! With the ring, a sync costs in proportion to the pages written. With the bitmap log it reads
//! KVM's bitmap into buffers kept from sync to sync (no fresh allocation per sync), and the
//! kernel re-arms only the 1 GiB chunks that have dirty pages (hypervisor's `dirty_bitmap.rs`).
//!
//! A sync has two halves, because the thread that sends need not be the one that owns the VM
//! (the `migration-send` thread makes no KVM call): [`DirtyPages::collect`] runs on the VM's
//! thread, [`DirtyPages::report`] where the round is built. The buffers travel between the two
//! ([`SourceVm::collect_dirty`]) and are reused sync after sync.

use hypervisor::DirtyLogKind;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vm_migration::DirtySink;

use super::source_vm::SourceVm;
use super::MigrationError;
use crate::vm::{Vm, VmError};

/// The pages written since the previous sync, per RAM region, in buffers kept between syncs.
#[derive(Clone, Debug, Default)]
pub struct DirtyPages {
    /// KVM's bitmap per RAM region (bitmap log only).
    bitmaps: Vec<Vec<u64>>,
    /// Page numbers per RAM region: the ring's harvest and the VMM's own writes.
    pages: Vec<Vec<u64>>,
    /// How KVM reported the guest's writes (`None` before the first collect).
    kind: Option<DirtyLogKind>,
}

impl DirtyPages {
    /// Reads every page written since the last sync (by the guest or the VMM) on `vm`'s own
    /// thread, and re-arms dirty tracking for them unless `rearm` is false (the last sync of a
    /// paused guest: the bitmap is read, not re-armed, which saves a scan and the kernel's
    /// re-protection while the guest waits). RAM region `i` is KVM slot `i`.
    pub fn collect(&mut self, vm: &Vm, rearm: bool) -> Result<(), VmError> {
        let hv = vm.hypervisor_vm();
        let kind = hv.dirty_log_kind();
        let regions = vm.memory().num_regions();
        if self.kind != Some(kind) || self.pages.len() != regions {
            self.bitmaps = vm
                .memory()
                .iter()
                .map(|r| match kind {
                    DirtyLogKind::Ring => Vec::new(),
                    DirtyLogKind::Bitmap => {
                        let words = r.len().div_ceil(4096).div_ceil(64);
                        vec![0u64; usize::try_from(words).unwrap_or(0)]
                    }
                })
                .collect();
            self.pages = vec![Vec::new(); regions];
            self.kind = Some(kind);
        }
        for pages in &mut self.pages {
            pages.clear();
        }
        match kind {
            DirtyLogKind::Ring => {
                for p in hv.harvest_dirty_pages().map_err(VmError::Hypervisor)? {
                    // A slot that is not RAM would be a KVM bug; its pages cannot be sent.
                    if let Some(list) = self.pages.get_mut(p.slot as usize) {
                        list.push(p.page);
                    }
                }
            }
            DirtyLogKind::Bitmap => {
                for (slot, buffer) in self.bitmaps.iter_mut().enumerate() {
                    let read = if rearm {
                        hv.sync_dirty_bitmap(slot as u32, buffer)
                    } else {
                        hv.read_dirty_bitmap(slot as u32, buffer)
                    };
                    read.map_err(VmError::Hypervisor)?;
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
        }
        Ok(())
    }

    /// Reports what [`DirtyPages::collect`] found into `sink`.
    pub fn report(&self, sink: &mut dyn DirtySink) -> Result<(), MigrationError> {
        if self.kind == Some(DirtyLogKind::Bitmap) {
            for (slot, buffer) in self.bitmaps.iter().enumerate() {
                sink.add_log(slot, buffer).map_err(MigrationError::Round)?;
            }
        }
        for (index, list) in self.pages.iter().enumerate() {
            if !list.is_empty() {
                sink.add_pages(index, list).map_err(MigrationError::Round)?;
            }
        }
        Ok(())
    }

    /// `ring` or `bitmap`: how KVM reported the guest's writes (empty before a collect).
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Some(DirtyLogKind::Ring) => "ring",
            Some(DirtyLogKind::Bitmap) => "bitmap",
            None => "",
        }
    }
}

/// The sender's side of dirty-log syncs: it keeps the buffers between syncs.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    pages: DirtyPages,
}

impl DirtyTracker {
    /// Reports every page written since the last sync into `sink`, and re-arms tracking.
    pub fn sync(
        &mut self,
        vm: &dyn SourceVm,
        sink: &mut dyn DirtySink,
    ) -> Result<(), MigrationError> {
        self.collect(vm, sink, true)
    }

    /// As [`DirtyTracker::sync`], for the last sync of a paused guest (not re-armed).
    pub fn final_sync(
        &mut self,
        vm: &dyn SourceVm,
        sink: &mut dyn DirtySink,
    ) -> Result<(), MigrationError> {
        self.collect(vm, sink, false)
    }

    /// `ring` or `bitmap`, once a sync has run.
    pub fn kind_name(&self) -> &'static str {
        self.pages.kind_name()
    }

    fn collect(
        &mut self,
        vm: &dyn SourceVm,
        sink: &mut dyn DirtySink,
        rearm: bool,
    ) -> Result<(), MigrationError> {
        let pages = std::mem::take(&mut self.pages);
        self.pages = vm.collect_dirty(pages, rearm).map_err(MigrationError::Vm)?;
        self.pages.report(sink)
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
        let mut tracker = DirtyTracker::default();

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
