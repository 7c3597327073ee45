//! A KVM VM.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irqchip, kvm_pit_config,
    kvm_userspace_memory_region, KvmIrqRouting, KVM_CAP_DIRTY_LOG_RING,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress as KvmIoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::dirty_bitmap;
use super::dirty_ring::{ring_bytes, DirtyRings};
use super::vcpu::KvmVcpu;
use crate::cpu::Vcpu;
use crate::vm::{
    DataMatch, DirtyLogKind, DirtyPage, IoEventAddress, IrqRoute, Result, UserMemoryRegion, Vm,
    VmError, VmState,
};

/// Where KVM on Intel wants its TSS and identity map: three pages just below the BIOS area.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Which optional pieces of vCPU state this host can save.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VcpuCaps {
    pub xcrs: bool,
    pub debugregs: bool,
}

/// Turns on the dirty ring of a VM that has no vCPU yet, when the kernel has one (the
/// acquire/release variant preferred). `None` (the bitmap log) when it has not, or refuses.
pub(crate) fn enable_dirty_ring(fd: &VmFd, entries: u32) -> Option<Arc<DirtyRings>> {
    let cap = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find(|&cap| fd.check_extension_raw(u64::from(cap)) > 0)?;
    let bytes = ring_bytes(fd.check_extension_raw(u64::from(cap)), entries)?;
    // SAFETY: `fd` is an open VM descriptor for the duration of this borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    let dup = match borrowed.try_clone_to_owned() {
        Ok(dup) => dup,
        Err(e) => {
            log::info!("cannot duplicate the VM descriptor ({e}); using the dirty bitmap");
            return None;
        }
    };
    let enable = kvm_enable_cap {
        cap,
        args: [u64::from(bytes), 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = fd.enable_cap(&enable) {
        log::info!("dirty ring refused ({e}); using the dirty bitmap");
        return None;
    }
    Some(Arc::new(DirtyRings::new(dup, bytes)))
}

/// A KVM VM: the VM file descriptor plus the slots the VMM registered.
pub struct KvmVm {
    fd: VmFd,
    slots: Mutex<HashMap<u32, UserMemoryRegion>>,
    msrs: Vec<u32>,
    caps: VcpuCaps,
    has_pit: Mutex<bool>,
    /// The vCPUs' dirty rings, when the VM logs dirty pages that way.
    rings: Option<Arc<DirtyRings>>,
    /// Whether reading the dirty bitmap leaves it armed (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2).
    manual_protect: AtomicBool,
}

impl KvmVm {
    pub(crate) fn new(
        fd: VmFd,
        msrs: Vec<u32>,
        caps: VcpuCaps,
        rings: Option<Arc<DirtyRings>>,
    ) -> Self {
        KvmVm {
            fd,
            slots: Mutex::new(HashMap::new()),
            msrs,
            caps,
            has_pit: Mutex::new(false),
            rings,
            manual_protect: AtomicBool::new(false),
        }
    }

    /// KVM_GET_DIRTY_LOG into `bitmap`; with manual protection, re-arms the chunks with
    /// dirty pages when `rearm` says so.
    fn read_bitmap(&self, slot: u32, bitmap: &mut [u64], rearm: bool) -> Result<()> {
        let pages = self.slot_pages(slot)?;
        if (bitmap.len() as u64) < pages.div_ceil(64) {
            return Err(VmError::GetDirtyLog {
                slot,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        dirty_bitmap::get(&self.fd, slot, bitmap)
            .map_err(|source| VmError::GetDirtyLog { slot, source })?;
        if rearm && self.manual_protect.load(Ordering::Acquire) {
            for (first, n) in dirty_bitmap::dirty_chunks(bitmap, pages) {
                let words = &bitmap[(first / 64) as usize..];
                dirty_bitmap::clear(&self.fd, slot, first, n, words)
                    .map_err(|source| VmError::ClearDirtyLog { slot, source })?;
            }
        }
        Ok(())
    }

    fn slot_pages(&self, slot: u32) -> Result<u64> {
        let slots = self.slots();
        let region = slots.get(&slot).ok_or(VmError::UnknownSlot(slot))?;
        Ok(region.memory_size.div_ceil(4096))
    }

    fn kvm_region(r: &UserMemoryRegion) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: r.slot,
            guest_phys_addr: r.guest_phys_addr,
            memory_size: r.memory_size,
            userspace_addr: r.userspace_addr,
            flags: if r.log_dirty_pages {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u32, UserMemoryRegion>> {
        // A poisoned lock only means another thread panicked while holding it; the map itself
        // is always left consistent, so keep using it.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves the in-kernel 8259 PICs as PC firmware hands them over: initialized, vector bases
    /// 0x08 and 0x70, every line masked. KVM creates them uninitialized (vector base 0, nothing
    /// masked) and the boot vCPU's LINT0 accepts ExtINT, so an OS that never programs the PIC
    /// (hardware-reduced ACPI Linux) would take an ISA interrupt routed to it (COM1's IRQ 4)
    /// as CPU exception vector 4. An OS that uses the PIC programs it anyway.
    fn init_legacy_pic(&self) -> std::io::Result<()> {
        for (chip_id, irq_base) in [
            (KVM_IRQCHIP_PIC_MASTER, 0x08),
            (KVM_IRQCHIP_PIC_SLAVE, 0x70),
        ] {
            let mut chip = self.get_chip(chip_id)?;
            // SAFETY: for a PIC chip id KVM_GET_IRQCHIP fills the union's `pic` member, a plain
            // byte struct valid for any contents.
            let mut pic = unsafe { chip.chip.pic };
            pic.imr = 0xff;
            pic.irq_base = irq_base;
            pic.init4 = 1;
            pic.init_state = 0;
            chip.chip.pic = pic;
            self.fd.set_irqchip(&chip).map_err(io)?;
        }
        Ok(())
    }

    fn get_chip(&self, chip_id: u32) -> std::io::Result<kvm_irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd.get_irqchip(&mut chip)?;
        Ok(chip)
    }
}

fn io(e: kvm_ioctls::Error) -> std::io::Error {
    e.into()
}

fn kvm_ioevent_addr(addr: IoEventAddress) -> KvmIoEventAddress {
    match addr {
        IoEventAddress::Pio(a) => KvmIoEventAddress::Pio(a),
        IoEventAddress::Mmio(a) => KvmIoEventAddress::Mmio(a),
    }
}

impl Vm for KvmVm {
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        let kvm_region = Self::kvm_region(&region);
        // SAFETY: the caller guarantees the host mapping outlives the slot (this fn's contract).
        unsafe { self.fd.set_user_memory_region(kvm_region) }.map_err(|e| {
            VmError::SetMemoryRegion {
                slot: region.slot,
                source: io(e),
            }
        })?;
        self.slots().insert(region.slot, region);
        Ok(())
    }

    fn remove_user_memory_region(&self, slot: u32) -> Result<()> {
        let mut slots = self.slots();
        let region = slots
            .get(&slot)
            .copied()
            .ok_or(VmError::UnknownSlot(slot))?;
        let mut kvm_region = Self::kvm_region(&region);
        kvm_region.memory_size = 0;
        kvm_region.flags = 0;
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced any more.
        unsafe { self.fd.set_user_memory_region(kvm_region) }.map_err(|e| {
            VmError::SetMemoryRegion {
                slot,
                source: io(e),
            }
        })?;
        slots.remove(&slot);
        Ok(())
    }

    fn set_dirty_logging(&self, slot: u32, enable: bool) -> Result<()> {
        let mut slots = self.slots();
        let region = slots.get_mut(&slot).ok_or(VmError::UnknownSlot(slot))?;
        let mut changed = *region;
        changed.log_dirty_pages = enable;
        // SAFETY: same mapping as registered before (set_user_memory_region's contract still holds);
        // only the flags change.
        unsafe { self.fd.set_user_memory_region(Self::kvm_region(&changed)) }.map_err(|e| {
            VmError::SetMemoryRegion {
                slot,
                source: io(e),
            }
        })?;
        *region = changed;
        Ok(())
    }

    fn enable_manual_dirty_log(&self) -> Result<bool> {
        let supported = self
            .fd
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        if supported <= 0 {
            return Ok(false);
        }
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            // Only the "manual protect" bit: no initially-all-set, so GET behaves as usual for a
            // freshly enabled slot.
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        self.fd
            .enable_cap(&cap)
            .map_err(|e| VmError::Setup("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", io(e)))?;
        self.manual_protect.store(true, Ordering::Release);
        Ok(true)
    }

    fn sync_dirty_bitmap(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        self.read_bitmap(slot, bitmap, true)
    }

    fn read_dirty_bitmap(&self, slot: u32, bitmap: &mut [u64]) -> Result<()> {
        self.read_bitmap(slot, bitmap, false)
    }

    fn dirty_log_kind(&self) -> DirtyLogKind {
        match self.rings {
            Some(_) => DirtyLogKind::Ring,
            None => DirtyLogKind::Bitmap,
        }
    }

    fn harvest_dirty_pages(&self) -> Result<Vec<DirtyPage>> {
        self.rings
            .as_ref()
            .ok_or(VmError::NoDirtyRing)?
            .harvest()
            .map_err(VmError::HarvestDirtyRing)
    }

    fn get_dirty_log(&self, slot: u32, memory_size: u64) -> Result<Vec<u64>> {
        let words = usize::try_from(memory_size.div_ceil(4096).div_ceil(64))
            .map_err(|_| VmError::UnknownSlot(slot))?;
        let mut bitmap = vec![0u64; words];
        self.sync_dirty_bitmap(slot, &mut bitmap)?;
        Ok(bitmap)
    }

    fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()> {
        if u64::from(num_pages) > bitmap.len() as u64 * 64 {
            return Err(VmError::ClearDirtyLog {
                slot,
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        dirty_bitmap::clear(&self.fd, slot, first_page, num_pages, bitmap)
            .map_err(|source| VmError::ClearDirtyLog { slot, source })
    }

    fn create_irqchip(&self) -> Result<()> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| VmError::Setup("KVM_SET_TSS_ADDR", io(e)))?;
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Setup("KVM_SET_IDENTITY_MAP_ADDR", io(e)))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| VmError::CreateIrqchip(io(e)))?;
        self.init_legacy_pic()
            .map_err(|e| VmError::Setup("KVM_SET_IRQCHIP (8259 PIC)", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| VmError::CreatePit(io(e)))?;
        *self.has_pit.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| VmError::Irqfd { gsi, source: io(e) })
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .unregister_irqfd(fd, gsi)
            .map_err(|e| VmError::Irqfd { gsi, source: io(e) })
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        let a = kvm_ioevent_addr(addr);
        let r = match datamatch {
            DataMatch::Any => self.fd.register_ioevent(fd, &a, NoDatamatch),
            DataMatch::U32(v) => self.fd.register_ioevent(fd, &a, v),
            DataMatch::U64(v) => self.fd.register_ioevent(fd, &a, v),
        };
        r.map_err(|e| VmError::Ioevent {
            addr,
            source: io(e),
        })
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()> {
        let a = kvm_ioevent_addr(addr);
        let r = match datamatch {
            DataMatch::Any => self.fd.unregister_ioevent(fd, &a, NoDatamatch),
            DataMatch::U32(v) => self.fd.unregister_ioevent(fd, &a, v),
            DataMatch::U64(v) => self.fd.unregister_ioevent(fd, &a, v),
        };
        r.map_err(|e| VmError::Ioevent {
            addr,
            source: io(e),
        })
    }

    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(routing_entry).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| VmError::GsiRouting(std::io::Error::from_raw_os_error(libc::E2BIG)))?;
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| VmError::GsiRouting(io(e)))
    }

    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()> {
        self.fd
            .set_irq_line(irq, active)
            .map_err(|e| VmError::IrqLine(irq, io(e)))
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::CreateVcpu(id, io(e)))?;
        if let Some(rings) = &self.rings {
            rings
                .map_vcpu(&fd)
                .map_err(|e| VmError::Setup("mmap of the vCPU dirty ring", e))?;
        }
        Ok(Box::new(KvmVcpu::new(
            fd,
            self.msrs.clone(),
            self.caps,
            self.rings.clone(),
        )))
    }

    fn state(&self) -> Result<VmState> {
        let pic_master = self
            .get_chip(KVM_IRQCHIP_PIC_MASTER)
            .map_err(|e| VmError::SaveState("PIC master", e))?;
        let pic_slave = self
            .get_chip(KVM_IRQCHIP_PIC_SLAVE)
            .map_err(|e| VmError::SaveState("PIC slave", e))?;
        let ioapic = self
            .get_chip(KVM_IRQCHIP_IOAPIC)
            .map_err(|e| VmError::SaveState("IOAPIC", e))?;
        let pit = if *self.has_pit.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(
                self.fd
                    .get_pit2()
                    .map_err(|e| VmError::SaveState("PIT", io(e)))?,
            )
        } else {
            None
        };
        let clock = if self.fd.check_extension(Cap::AdjustClock) {
            self.fd.get_clock().ok()
        } else {
            None
        };
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    fn set_state(&self, state: &VmState) -> Result<()> {
        for (chip, name) in [
            (&state.pic_master, "PIC master"),
            (&state.pic_slave, "PIC slave"),
            (&state.ioapic, "IOAPIC"),
        ] {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::RestoreState(name, io(e)))?;
        }
        if let Some(pit) = &state.pit {
            self.fd
                .set_pit2(pit)
                .map_err(|e| VmError::RestoreState("PIT", io(e)))?;
        }
        if let Some(clock) = &state.clock {
            let mut clock = *clock;
            // Only the clock value is restored; flags describe the source host.
            clock.flags = 0;
            self.fd
                .set_clock(&clock)
                .map_err(|e| VmError::RestoreState("clock", io(e)))?;
        }
        Ok(())
    }
}

fn routing_entry(route: &IrqRoute) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry::default();
    match *route {
        IrqRoute::Irqchip { gsi, chip, pin } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
        }
        IrqRoute::Msi { gsi, address, data } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
        }
    }
    e
}
