//! The virtio-pci transport, the PCI bus it sits on, and the virtio-balloon device with free page
//! hinting for live migration.
//!
//! ```text
//!   vCPU exits ──► PciConfigIo (0xCF8/0xCFC) ──► PciBus ──► PciDevice::{read,write}_config_register
//!   vCPU exits ──► PciBus::mmio_{read,write} ──► PciDevice::{read,write}_bar
//!                                                  │
//!                                   VirtioPciDevice<D: VirtioDevice>
//!                                   (common cfg, ISR, notify, device cfg, MSI-X)
//!                                                  │ activate(mem, interrupt, queues)
//!                                               Balloon ──► BalloonWorker thread (epoll)
//!                                                  ▲
//!                   VMM threads ── BalloonHandle ──┘ (resize, hint rounds, counters)
//! ```
//!
//! Guest memory is only ever touched through vm-memory's `Bytes` API (so the dirty bitmap sees
//! every VMM write), except for the documented `madvise`/`fallocate` release of balloon pages.

pub mod balloon;
pub mod interrupt;
pub mod pci;
mod sync;
pub mod transport;
pub mod virtio;

#[cfg(test)]
pub(crate) mod test_utils;

/// The guest memory type used by the whole VMM: mmap-backed regions with an atomic dirty bitmap
/// that records the VMM's own writes for migration.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub use balloon::{
    Balloon, BalloonConfig, BalloonCounters, BalloonError, BalloonHandle, BalloonState,
    BalloonStats, HintMode, HintRange, HintRound, HintState, HintStatus,
};
pub use interrupt::{
    InterruptError, IntxLine, MsiMessage, MsiVectors, VirtioInterrupt, VirtioInterruptType,
};
pub use pci::{
    BarAllocator, BarReprogram, PciBarInfo, PciBarKind, PciBus, PciConfigIo, PciConfiguration,
    PciDevice, PciError, PciHostBridge, PciIoEvent,
};
pub use transport::{VirtioPciDevice, VirtioPciError, VirtioPciState};
pub use virtio::{VirtioDevice, VirtioDeviceError, VirtioQueue};
