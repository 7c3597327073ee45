//! A VM: guest memory slots, dirty logging, interrupt plumbing and VM-wide state.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::cpu::Vcpu;

/// Errors from VM-level operations; each names the operation that failed.
#[derive(Debug, Error)]
pub enum VmError {
    /// Adding or changing a memory slot failed.
    #[error("cannot set memory slot {slot}")]
    SetMemoryRegion {
        /// The slot number.
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Reading a slot's dirty log failed.
    #[error("cannot read the dirty log of slot {slot}")]
    GetDirtyLog {
        /// The slot number.
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Clearing part of a slot's dirty log failed.
    #[error("cannot clear the dirty log of slot {slot}")]
    ClearDirtyLog {
        /// The slot number.
        slot: u32,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// A slot number that was never registered.
    #[error("unknown memory slot {0}")]
    UnknownSlot(u32),
    /// Creating the in-kernel interrupt controllers failed.
    #[error("cannot create the in-kernel irqchip")]
    CreateIrqchip(#[source] std::io::Error),
    /// Creating the in-kernel PIT failed.
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] std::io::Error),
    /// Registering or removing an irqfd failed.
    #[error("cannot (un)register an irqfd for GSI {gsi}")]
    Irqfd {
        /// The GSI.
        gsi: u32,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Registering or removing an ioeventfd failed.
    #[error("cannot (un)register an ioeventfd at {addr:?}")]
    Ioevent {
        /// The address.
        addr: IoEventAddress,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// Installing the GSI routing table failed.
    #[error("cannot set the GSI routing table")]
    GsiRouting(#[source] std::io::Error),
    /// Setting an interrupt line failed.
    #[error("cannot set IRQ line {0}")]
    IrqLine(u32, #[source] std::io::Error),
    /// Creating a vCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] std::io::Error),
    /// Saving VM-wide state failed; names the piece.
    #[error("cannot save VM state: {0}")]
    SaveState(&'static str, #[source] std::io::Error),
    /// Restoring VM-wide state failed; names the piece.
    #[error("cannot restore VM state: {0}")]
    RestoreState(&'static str, #[source] std::io::Error),
    /// Collecting the dirty rings failed.
    #[error("cannot harvest the dirty rings")]
    HarvestDirtyRing(#[source] std::io::Error),
    /// A dirty-ring operation on a VM that logs dirty pages in bitmaps.
    #[error("this VM has no dirty ring")]
    NoDirtyRing,
    /// A generic KVM setup call failed; names the call.
    #[error("KVM call failed: {0}")]
    Setup(&'static str, #[source] std::io::Error),
}

/// Result alias for [`VmError`].
pub type Result<T> = std::result::Result<T, VmError>;

/// One guest memory slot: guest-physical range backed by host virtual memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserMemoryRegion {
    /// The slot number.
    pub slot: u32,
    /// First guest-physical address.
    pub guest_phys_addr: u64,
    /// Size in bytes (a multiple of 4 KiB).
    pub memory_size: u64,
    /// Host virtual address of the backing mapping.
    pub userspace_addr: u64,
    /// Whether KVM records writes to this slot in its dirty log.
    pub log_dirty_pages: bool,
}

/// How the VM tells the VMM which pages the guest wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogKind {
    /// One bitmap per slot, read with [`Vm::get_dirty_log`]: each read costs in proportion to
    /// the slot's size.
    Bitmap,
    /// Rings of written pages, read with [`Vm::harvest_dirty_pages`]: each read costs in
    /// proportion to the pages written since the last one.
    Ring,
}

/// A page the guest wrote: its slot and its page number within the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirtyPage {
    /// The slot number.
    pub slot: u32,
    /// The 4 KiB page within the slot.
    pub page: u64,
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    /// A port I/O address.
    Pio(u64),
    /// A guest-physical MMIO address.
    Mmio(u64),
}

/// What value written to an ioeventfd address signals it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMatch {
    /// Any write.
    Any,
    /// Only a 32-bit write of this value.
    U32(u32),
    /// Only a 64-bit write of this value.
    U64(u64),
}

/// One entry of the GSI routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqRoute {
    /// A GSI routed to a pin of an in-kernel interrupt controller.
    Irqchip {
        /// The GSI.
        gsi: u32,
        /// 0 = PIC master, 1 = PIC slave, 2 = IOAPIC.
        chip: u32,
        /// The pin on that chip.
        pin: u32,
    },
    /// A GSI that raises an MSI message.
    Msi {
        /// The GSI.
        gsi: u32,
        /// MSI address.
        address: u64,
        /// MSI data.
        data: u32,
    },
}

/// VM-wide state that migration carries besides memory and vCPUs: the in-kernel interrupt
/// controllers, the PIT and the KVM clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub(crate) pic_master: kvm_bindings::kvm_irqchip,
    pub(crate) pic_slave: kvm_bindings::kvm_irqchip,
    pub(crate) ioapic: kvm_bindings::kvm_irqchip,
    pub(crate) pit: Option<kvm_bindings::kvm_pit_state2>,
    pub(crate) clock: Option<kvm_bindings::kvm_clock_data>,
}

/// A virtual machine.
pub trait Vm: Send + Sync {
    /// Adds or replaces a memory slot.
    ///
    /// # Safety
    /// `region.userspace_addr .. + memory_size` must be a mapping owned by the caller that stays
    /// valid until the slot is removed or the VM is dropped.
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()>;
    /// Removes a memory slot.
    fn remove_user_memory_region(&self, slot: u32) -> Result<()>;
    /// Turns KVM dirty logging on or off for a slot that was added before.
    fn set_dirty_logging(&self, slot: u32, enable: bool) -> Result<()>;
    /// Switches to manual dirty log protection when the kernel has it (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
    /// reading the log then no longer clears it, and [`Vm::clear_dirty_log`] must. Returns whether it
    /// is on. Call before any slot has dirty logging enabled.
    fn enable_manual_dirty_log(&self) -> Result<bool>;
    /// How this VM reports written pages: chosen when it was created (the ring when the
    /// kernel has it), fixed for its lifetime.
    fn dirty_log_kind(&self) -> DirtyLogKind;
    /// With [`DirtyLogKind::Ring`]: every page of a slot with dirty logging on that the guest
    /// wrote since the last call, re-armed so that the next write shows up again. A page may be
    /// listed more than once; the order is arbitrary. [`VmError::NoDirtyRing`] in bitmap mode.
    fn harvest_dirty_pages(&self) -> Result<Vec<DirtyPage>>;
    /// With [`DirtyLogKind::Bitmap`]: fills `bitmap` (one bit per 4 KiB page of the slot, KVM
    /// layout; at least that long) with the pages written since the last sync of this slot,
    /// and re-arms them, so that the next write shows up again. The buffer is the caller's, to
    /// be reused from sync to sync; with manual protection only the parts with dirty pages are
    /// re-armed.
    fn sync_dirty_bitmap(&self, slot: u32, bitmap: &mut [u64]) -> Result<()>;
    /// As [`Vm::sync_dirty_bitmap`], but with manual protection nothing is re-armed: for the
    /// last read of a paused guest, after which dirty logging stops (one scan of the bitmap
    /// and the kernel's re-protection are saved while the guest waits).
    fn read_dirty_bitmap(&self, slot: u32, bitmap: &mut [u64]) -> Result<()>;
    /// Reads a slot's dirty log: one bit per 4 KiB page, in 64-bit words. Without manual
    /// protection this also clears it. Only with [`DirtyLogKind::Bitmap`].
    fn get_dirty_log(&self, slot: u32, memory_size: u64) -> Result<Vec<u64>>;
    /// Clears (re-protects) the pages set in `bitmap`, whose bit 0 is page `first_page` of the slot.
    /// `first_page` must be a multiple of 64. Needed only with manual protection.
    fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u32,
        bitmap: &[u64],
    ) -> Result<()>;
    /// Creates the in-kernel PIC (initialized and fully masked, as firmware leaves it), IOAPIC,
    /// local APICs and PIT.
    fn create_irqchip(&self) -> Result<()>;
    /// Makes a write to `fd` raise `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Undoes [`Vm::register_irqfd`].
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// Makes a guest write at `addr` (matching `datamatch`) signal `fd` without leaving the kernel.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()>;
    /// Undoes [`Vm::register_ioevent`].
    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: DataMatch,
    ) -> Result<()>;
    /// Replaces the whole GSI routing table.
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> Result<()>;
    /// Sets the level of an interrupt line of the in-kernel irqchip.
    fn set_irq_line(&self, irq: u32, active: bool) -> Result<()>;
    /// Creates vCPU `id`.
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
    /// Saves VM-wide state (irqchips, PIT, clock).
    fn state(&self) -> Result<VmState>;
    /// Restores VM-wide state saved by [`Vm::state`].
    fn set_state(&self, state: &VmState) -> Result<()>;
}
